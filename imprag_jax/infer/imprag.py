"""Two-stage ImpRAG inference and per-task evaluation.

Stage 1: the bottom group runs on the prompt -> E_q at layer b -> search over the passage index -> top-k ids.
Stage 2: the k passages run through bottom and middle once (their K/V goes into the cache), the prompt continues
through middle and top, and greedy decoding reuses the cached passage K/V for every new token.
Retrieval happens once per prompt.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig, query_embedding
from ..model.transformer import passage_kv, prompt_offset, run_bottom
from . import metrics as M
from .generate import greedy_generate


@partial(jax.jit, static_argnames=("cfg",))
def _query_emb(params, cfg: ModelConfig, tokens, mask):
    return query_embedding(params, cfg, tokens, mask)


@partial(jax.jit, static_argnames=("cfg",))
def read_passages(params, cfg: ModelConfig, passages, passage_mask):
    """[B, k, L] passages -> their middle-group K/V (the part of the cache the prompt reads)."""
    B, k, L = passages.shape
    h = run_bottom(params, cfg, passages.reshape(B * k, L), passage_mask.reshape(B * k, L))
    return passage_kv(params, cfg, h.reshape(B, k, L, -1), passage_mask)


def score_bias(scores, valid, l_max: int):
    """Extension (`reader.score_bias`): log_softmax over the k passages, repeated over each passage's tokens."""
    s = jnp.where(valid, scores, -1e30)
    g = jnp.where(valid, jax.nn.log_softmax(s, axis=-1), 0.0)
    return jnp.repeat(g, l_max, axis=1)


def prompts_from_batch(tokens: np.ndarray, mask: np.ndarray) -> List[List[int]]:
    return [list(map(int, t[m > 0])) for t, m in zip(np.asarray(tokens), np.asarray(mask))]


def generate_with_passages(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], passages, passage_mask, *,
                           max_new_tokens: int, stop_ids, pad_id: int, scores=None, use_score_bias=False):
    """Stage 2 for given passages [B, k, L] (k may be 0 -> closed book)."""
    if passages is None or passages.shape[1] == 0:
        return greedy_generate(params, cfg, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               pad_id=pad_id)
    passages, passage_mask = jnp.asarray(passages), jnp.asarray(passage_mask)
    pkv = read_passages(params, cfg, passages, passage_mask)
    B, k, L = passages.shape
    bias = None
    if use_score_bias and scores is not None:
        bias = score_bias(jnp.asarray(scores), passage_mask.sum(-1) > 0, L)
    return greedy_generate(params, cfg, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                           pkv=pkv, prefix_bias=bias, offset=prompt_offset(cfg, k, L))


class Retriever:
    """The corpus as the model reads it (host tokens) plus its embedding index, searched on device."""

    def __init__(self, index, tokens: np.ndarray, mask: np.ndarray, texts: Optional[Sequence[str]] = None,
                 backend: str = "exact"):
        self.index, self.tokens, self.mask, self.texts, self.backend = index, np.asarray(tokens), np.asarray(mask), \
            texts, backend

    @classmethod
    def build(cls, params, cfg: ModelConfig, tokens, mask, texts=None, *, step: int = 0, batch_size: int = 256,
              mesh=None, backend: str = "exact", progress: bool = False):
        from ..retrieval import encode_corpus

        index = encode_corpus(params, cfg, tokens, mask, batch_size=batch_size, mesh=mesh, step=step,
                              keep_tokens=False, progress=progress)
        return cls(index, tokens, mask, texts, backend)

    def search(self, e_q, k: int):
        from ..retrieval import search

        k = min(k, self.index.n)
        scores, ids = search(self.index, jnp.asarray(e_q), k, self.backend)
        return np.asarray(scores), np.asarray(ids)

    def gather(self, ids: np.ndarray):
        ids = np.asarray(ids)
        safe = np.maximum(ids, 0)
        t, m = self.tokens[safe], self.mask[safe] * (ids >= 0)[..., None]
        return t, m


def answer(params, cfg: ModelConfig, retriever: Retriever, tokens, mask, *, k: int, max_new_tokens: int,
           stop_ids, pad_id: int, search_k: int = 10, use_score_bias: bool = False):
    """Two-stage inference for a batch of right- or left-padded prompts. Returns (outputs, ids [B, search_k],
    scores [B, search_k])."""
    e_q = _query_emb(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    scores, ids = retriever.search(e_q, max(k, search_k))
    prompts = prompts_from_batch(tokens, mask)
    if k == 0:
        outs = generate_with_passages(params, cfg, prompts, None, None, max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, pad_id=pad_id)
    else:
        pt, pm = retriever.gather(ids[:, :k])
        outs = generate_with_passages(params, cfg, prompts, pt, pm, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                      pad_id=pad_id, scores=scores[:, :k], use_score_bias=use_score_bias)
    return outs, ids, scores


TRUE_FALSE_TASKS = ("fact_verification", "scifact")


def evaluate_task(params, cfg: ModelConfig, data_dir: str, task: str, tokenizer, retriever: Optional[Retriever], *,
                  split: str = "dev", mode: str = "imprag", k: int = 1, L_q: int = 64, l_max: int = 32,
                  max_new_tokens: int = 8, batch_size: int = 64, limit: Optional[int] = None,
                  use_score_bias: bool = False, keep_predictions: int = 0) -> Dict:
    """EM / F1 (/ accuracy for true-false tasks) and recall@1/5/10 for one task split.

    mode: "imprag" (retrieve with the model's own embeddings, read the top k), "closed_book" (no passages),
    "oracle" (the gold passages), "bm25" (the stored BM25 top k).
    """
    from ..data.pipeline import eval_batches

    passages = {"imprag": "none", "closed_book": "none", "oracle": "gold", "bm25": "pseudo"}[mode]
    stop = tokenizer.stop_ids
    rows: List[Dict] = []
    for batch in eval_batches(data_dir, task, split, tokenizer, batch_size=batch_size, L_q=L_q, passages=passages,
                              k=max(k, 1), l_max=l_max, limit=limit):
        valid = batch["valid"] > 0
        ids = scores = None
        if mode == "imprag":
            outs, ids, scores = answer(params, cfg, retriever, batch["tokens"], batch["mask"], k=k,
                                       max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=tokenizer.pad_id,
                                       use_score_bias=use_score_bias)
        elif mode == "closed_book":
            outs = generate_with_passages(params, cfg, prompts_from_batch(batch["tokens"], batch["mask"]), None,
                                          None, max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=tokenizer.pad_id)
        else:
            outs = generate_with_passages(params, cfg, prompts_from_batch(batch["tokens"], batch["mask"]),
                                          batch["passages"][:, :k], batch["passage_mask"][:, :k],
                                          max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=tokenizer.pad_id)
            ids = batch["passage_ids"]
        for i in np.nonzero(valid)[0]:
            pred = tokenizer.decode(outs[i]).strip()
            ans = batch["answers"][i]
            row = {"id": batch["ids"][i], "prediction": pred, "answers": ans, "em": M.exact_match(pred, ans),
                   "f1": M.f1_score(pred, ans)}
            if task in TRUE_FALSE_TASKS or set(M.normalize_answer(a) for a in ans) <= {"true", "false"}:
                row["accuracy"] = M.accuracy_true_false(pred, ans)
                row["true_false"] = True
            if ids is not None and mode == "imprag":
                r = [int(x) for x in ids[i]]
                gold = batch["gold_ids"][i]
                for kk in (1, 5, 10):
                    if (gold >= 0).any():
                        row[f"gold_recall@{kk}"] = M.gold_in_topk(r, gold, kk)
                    if retriever is not None and retriever.texts is not None and not row.get("true_false"):
                        row[f"answer_recall@{kk}"] = M.answer_in_passages([retriever.texts[j] for j in r[:kk]], ans,
                                                                          kk)
                row["retrieved"] = r[:10]
            rows.append(row)
    out: Dict = {"task": task, "split": split, "mode": mode, "k": k, "n": len(rows)}
    keys = sorted({key for r in rows for key in r if key in ("em", "f1", "accuracy") or "recall@" in key})
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(vals)) if vals else None
    if keep_predictions:
        out["examples"] = [{k2: r[k2] for k2 in ("id", "prediction", "answers", "em")} for r in rows[:keep_predictions]]
    return out
