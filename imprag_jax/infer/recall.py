"""Retrieval-only evaluation: gold-passage and answer recall@k of the model's implicit retriever (E_q at layer b
against every pool passage's E_p), with BM25 on the same pool and the same prompts beside it. No generation, so it
is cheap enough to run during training (`eval.dev_modes=recall`) and to plot recall against steps.

The pool is the whole knowledge source, or (`pool=N`) a seeded sample of N passages that always holds the gold
passages of every evaluated question: recall over a smaller pool is higher, so every row records its pool size and
the chance level of recall@5 (5 / pool).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..model.transformer import query_embedding
from . import metrics as M

RECALL_KS = (1, 5, 10, 20)
MODES = ("recall", "bm25_recall")


@partial(jax.jit, static_argnames=("cfg",))
def _e_q(params, cfg: ModelConfig, tokens, mask):
    return query_embedding(params, cfg, tokens, mask)


def _collect(data_dir: str, task: str, split: str, tokenizer, *, limit, L_q: int, add_bos: bool, batch_size: int):
    from ..data.pipeline import eval_batches

    out = {"tokens": [], "mask": [], "gold": [], "answers": [], "prompts": []}
    for b in eval_batches(data_dir, task, split, tokenizer, batch_size=batch_size, L_q=L_q, passages="none",
                          add_bos=add_bos, limit=limit):
        v = np.nonzero(b["valid"] > 0)[0]
        out["tokens"].append(b["tokens"])
        out["mask"].append(b["mask"] * (b["valid"][:, None] > 0))
        out["gold"] += [[int(g) for g in b["gold_ids"][i] if g >= 0] for i in range(len(b["valid"]))]
        out["answers"] += [list(a) for a in b["answers"]]
        out["prompts"] += list(b["prompts"])
        out["valid"] = out.get("valid", []) + list(b["valid"] > 0)
    return out


def eval_gold(data_dir: str, tasks: Sequence[str], tokenizer, *, split: str = "dev", limit=None, L_q: int = 64,
              add_bos: bool = True) -> List[List[int]]:
    """The gold passage rows of every evaluated question of `tasks` (what a pool must hold)."""
    return [g for t in tasks for g in _collect(data_dir, t, split, tokenizer, limit=limit, L_q=L_q, add_bos=add_bos,
                                               batch_size=64)["gold"]]


def pool_rows(n_passages: int, gold: Sequence[Sequence[int]], pool: int, seed: int = 0) -> np.ndarray:
    """Sorted passage rows of the evaluation pool: all of them (pool <= 0 or >= n), else every gold passage plus a
    seeded sample of the others up to `pool` rows."""
    if pool <= 0 or pool >= n_passages:
        return np.arange(n_passages)
    need = sorted({g for gs in gold for g in gs})
    if len(need) > pool:
        raise ValueError(f"eval pool of {pool} passages cannot hold the {len(need)} gold passages of the evaluated "
                         "questions: raise eval.pool or lower eval.limit")
    rest = np.setdiff1d(np.arange(n_passages), need)
    pick = np.random.default_rng(seed).permutation(rest)[:pool - len(need)]
    return np.sort(np.concatenate([np.asarray(need, np.int64), pick]))


def _row(task, split, mode, pool_n, ranked, gold, answers, texts, valid) -> Dict:
    idx = [i for i in range(len(gold)) if valid[i]]
    with_gold = [i for i in idx if gold[i]]
    row: Dict = {"task": task, "split": split, "mode": mode, "k": 0, "n": len(idx), "n_gold": len(with_gold),
                 "pool": int(pool_n),
                 "chance_gold_recall@5": float(np.mean([min(1.0, 5.0 * len(gold[i]) / pool_n) for i in with_gold]))
                 if with_gold else None}
    for k in RECALL_KS:
        # over the examples with a gold passage (n_gold of n); None, not 0, when there are none
        row[f"gold_recall@{k}"] = float(np.mean([M.gold_in_topk(list(ranked[i]), gold[i], k) for i in with_gold])) \
            if with_gold else None
        ans = [i for i in idx if answers[i] and M.true_false(answers[i][0]) is None]
        if ans and texts is not None:
            row[f"answer_recall@{k}"] = float(np.mean([M.answer_in_passages([texts[j] for j in ranked[i][:k]],
                                                                           answers[i], k) for i in ans]))
    return row


def recall_rows(params, cfg: Optional[ModelConfig], data_dir: str, tasks: Sequence[str], tokenizer, *,
                corpus=None, texts: Optional[Sequence[str]] = None, modes: Sequence[str] = MODES, split: str = "dev",
                limit: Optional[int] = None, L_q: int = 64, add_bos: bool = True, pool: int = 0, seed: int = 0,
                batch_size: int = 64, encode_batch: int = 64, progress: bool = False, tokenize=None,
                n_passages: Optional[int] = None, l_max: Optional[int] = None, mesh=None) -> List[Dict]:
    """One row per task and mode ("recall": the model's retriever; "bm25_recall": BM25 with the prompt text as the
    query) over the same pool. corpus: (tokens [N, l], mask [N, l]) of the whole knowledge source; or, in a
    multi-process run (every process calls it together), `tokenize(rows) -> (tokens, mask)` with `n_passages`,
    `l_max` and the global `mesh`: each process tokenizes and encodes only the pool rows its devices hold
    (`encode_corpus_sharded`), the pool's index on the mesh; the same rows as the single-process call."""
    from ..retrieval import encode_corpus
    from ..retrieval.encode import encode_corpus_sharded
    from ..retrieval.pool import bm25_search
    from .imprag import to_host

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown recall modes {bad}; choose from {MODES}")
    per_task = {t: _collect(data_dir, t, split, tokenizer, limit=limit, L_q=L_q, add_bos=add_bos,
                            batch_size=batch_size) for t in tasks}
    n_source = len(corpus[0]) if tokenize is None else int(n_passages)
    sel = pool_rows(n_source, [g for d in per_task.values() for g in d["gold"]], pool, seed)
    kmax = max(RECALL_KS)
    rows: List[Dict] = []
    emb = None
    if "recall" in modes and tokenize is None:
        toks, mask = corpus
        index = encode_corpus(params, cfg, np.asarray(toks)[sel], np.asarray(mask)[sel], batch_size=encode_batch,
                              keep_tokens=False, progress=progress)
        emb = jnp.asarray(index.embeddings, jnp.float32)[: len(sel)]  # not the rows that pad it to the mesh
    elif "recall" in modes:
        index = encode_corpus_sharded(params, cfg, len(sel), lambda ix: tokenize(sel[ix]), mesh=mesh, l_max=l_max,
                                      batch_size=encode_batch, keep_tokens=False)
        emb = jnp.asarray(index.embeddings, jnp.float32)[: len(sel)]
    sub_texts = [texts[j] for j in sel] if texts is not None and "bm25_recall" in modes else None
    for task, d in per_task.items():
        if "recall" in modes:
            e_q = jnp.concatenate([_e_q(params, cfg, jnp.asarray(t), jnp.asarray(m))
                                   for t, m in zip(d["tokens"], d["mask"])])
            _, local = jax.lax.top_k(e_q @ emb.T, min(kmax, len(sel)))
            ranked = sel[to_host(local)]
            rows.append(_row(task, split, "recall", len(sel), ranked, d["gold"], d["answers"], texts, d["valid"]))
        if "bm25_recall" in modes:
            if sub_texts is None:
                raise ValueError("bm25_recall needs the passage texts")
            q = [p if p else "empty" for p in d["prompts"]]
            ranked = sel[bm25_search(sub_texts, q, min(kmax, len(sel)))]
            rows.append(_row(task, split, "bm25_recall", len(sel), ranked, d["gold"], d["answers"], texts,
                             d["valid"]))
    return rows
