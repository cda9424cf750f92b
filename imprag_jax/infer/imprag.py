"""Two-stage ImpRAG inference and per-task evaluation.

Stage 1: the bottom group runs on the prompt (its K/V goes into the decoding cache) -> E_q at layer b -> search
over the passage index (the device `search`, or host ScaNN) -> top-k ids.
Stage 2: the k passages run through bottom and middle once (their middle-group K/V joins the cache), the prompt
continues from its layer-b states through middle and top, and greedy decoding reuses the cached passage K/V for
every new token. Retrieval happens once per prompt; nothing of stage 1 is recomputed.

`evaluate_task` (one task, one mode, one k) and `evaluate_modes` (one task, one mode, several k in one pass over
the data, stage 1 and the search shared by every k) compute EM / F1 (KILT normalisation), accuracy for true/false
tasks and retrieval recall@1/5/10 (answer as a substring, as in the paper; gold provenance where the data has it).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..model.transformer import PassageKV, passage_kv, prompt_offset, run_bottom
from . import metrics as M
from ..model.decode import continue_and_decode, cut_at_stop, encode_prompts, greedy_generate, left_pad, stop_array

MODES = ("imprag", "closed_book", "oracle", "bm25")
RECALL_KS = (1, 5, 10)


@partial(jax.jit, static_argnames=("cfg",))
def read_passages(params, cfg: ModelConfig, passages, passage_mask) -> PassageKV:
    """[B, k, L] passages -> their middle-group K/V (the part of the cache the prompt reads): each passage alone
    through the bottom group, then in its slot through the middle group (`model.transformer.passage_kv`)."""
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


# ------------------------------------------------------------------------------------------------ stages
class Encoded(NamedTuple):
    """Stage-1 output for a batch of prompts (left-padded)."""
    h_b: jax.Array  # [B, L, d] prompt states at the input of layer b
    e_q: jax.Array  # [B, D] fp32 query embeddings
    cache: object  # decoding cache holding the bottom group's K/V
    mask: jax.Array  # [B, L] left-padded prompt mask
    max_new_tokens: int


def encode(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, pad_id: int,
           max_new_tokens: int) -> Encoded:
    """Stage 1: prompts (token ids) -> layer-b states, E_q and the bottom group's cache."""
    toks, mask = left_pad(prompts, pad_id)
    mask = jnp.asarray(mask)
    h, e_q, cache = encode_prompts(params, cfg, jnp.asarray(toks), mask, max_new_tokens)
    return Encoded(h, e_q, cache, mask, max_new_tokens)


def read_and_generate(params, cfg: ModelConfig, enc: Encoded, passages=None, passage_mask=None, *, stop_ids,
                      scores=None, use_score_bias: bool = False, pkv: Optional[PassageKV] = None) -> List[List[int]]:
    """Stage 2 for given passages [B, k, l_max] (None or k = 0: closed book) -> generated ids per prompt.
    pkv: the passages' middle-group K/V when already at hand (a `kv_store.KVStore.load`); `passages` then only
    gives the shapes and `passage_mask` the empty slots (for the score bias)."""
    bias = None
    offset = 0
    if passages is not None and passages.shape[1] > 0:
        passages, passage_mask = jnp.asarray(passages), jnp.asarray(passage_mask)
        if pkv is None:
            pkv = read_passages(params, cfg, passages, passage_mask)
        B, k, L = passages.shape
        offset = prompt_offset(cfg, k, L)
        if use_score_bias and scores is not None:  # over each slot's columns (narrower for an H2O store's K/V)
            bias = score_bias(jnp.asarray(scores, jnp.float32), passage_mask.sum(-1) > 0, pkv.mask.shape[1] // k)
    if enc.max_new_tokens < 1:
        return [[] for _ in range(enc.mask.shape[0])]
    out, _ = continue_and_decode(params, cfg, enc.h_b, enc.mask, enc.cache, stop_array(stop_ids), pkv, bias,
                                 jnp.int32(offset), enc.max_new_tokens)
    return cut_at_stop(to_host(out), stop_ids)


def generate_with_passages(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], passages, passage_mask, *,
                           max_new_tokens: int, stop_ids, pad_id: int, scores=None, use_score_bias=False):
    """Both stages for given passages [B, k, L] (k may be 0 or None -> closed book)."""
    if passages is None or passages.shape[1] == 0:
        return greedy_generate(params, cfg, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               pad_id=pad_id)
    enc = encode(params, cfg, prompts, pad_id=pad_id, max_new_tokens=max_new_tokens)
    return read_and_generate(params, cfg, enc, passages, passage_mask, stop_ids=stop_ids, scores=scores,
                             use_score_bias=use_score_bias)


# ------------------------------------------------------------------------------------------------ retriever
@partial(jax.jit, static_argnames=("k", "backend"))
def _device_search(index, e_q, k: int, backend: str):
    """`retrieval.search` compiled once per (index shape, query batch, k, backend): called eagerly it traces and
    compiles its shard_map on every call (1-2 s each on the CPU)."""
    from ..retrieval import search

    return search(index, e_q, k, backend)


@jax.jit
def _device_gather(index, ids):
    """Token ids / mask [B, k, l_max] of index rows `ids` (-1: empty) from the index's device-resident tokens,
    replicated on the index's mesh (every process can read them)."""
    from jax.sharding import NamedSharding, PartitionSpec

    safe = jnp.maximum(ids, 0)
    t = index.tokens[safe]
    m = index.mask[safe] * (ids >= 0)[..., None].astype(index.mask.dtype)
    if index.mesh is not None:
        rep = NamedSharding(index.mesh, PartitionSpec())
        t, m = jax.lax.with_sharding_constraint(t, rep), jax.lax.with_sharding_constraint(m, rep)
    return t, m


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as numpy: directly when this process holds all of it (fully addressable or
    replicated), else gathered from every process (then every process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Retriever:
    """The corpus as the model reads it (host tokens, or the index's own device-resident tokens) plus its
    embedding index.

    backend: "exact" | "binned" | "approx" (the device `imprag_jax.retrieval.search`) or "scann" (a host ScaNN
    searcher built from the same embeddings on first use by `scann_backend.build_searcher`, the builder training
    with train.index_backend = "scann" uses too; needs the optional `scann` package).
    kv_store: an opened `kv_store.KVStore` of the same knowledge source: the retrieved passages' middle-group K/V
    are then loaded from it instead of computed (`from_kv_store` also takes the index's E_p from it).

    `build` encodes the whole corpus on this process; `build_sharded` (multi-process runs) builds the index on a
    global mesh with each process tokenizing and encoding only the rows its devices hold; the passages read are
    then gathered from the index's tokens on the devices (`tokens`/`mask` are None).
    """

    def __init__(self, index, tokens: Optional[np.ndarray], mask: Optional[np.ndarray],
                 texts: Optional[Sequence[str]] = None, backend: str = "exact", rows: Optional[np.ndarray] = None,
                 kv_store=None):
        from ..retrieval.search import BACKENDS

        if backend not in BACKENDS + ("scann",):
            raise ValueError(f"unknown retrieval backend {backend!r}; choose one of {BACKENDS + ('scann',)}")
        if tokens is None and (index.tokens is None or index.mask is None):
            raise ValueError("a Retriever without host tokens needs an index that keeps its tokens and mask")
        self.index, self.texts, self.backend = index, texts, backend
        self.tokens = None if tokens is None else np.asarray(tokens)
        self.mask = None if mask is None else np.asarray(mask)
        if self.tokens is not None and len(self.tokens) != index.n:
            raise ValueError(f"the index has {index.n} rows but the corpus {len(self.tokens)} passages")
        # rows: when the index holds a pool (a subset of the knowledge source), the knowledge-source row of each of
        # its passages (sorted); search returns and gather takes knowledge-source rows either way
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        if self.rows is not None and (len(self.rows) != index.n or np.any(np.diff(self.rows) <= 0)):
            raise ValueError("rows must be the sorted knowledge-source rows of the index's passages")
        self._scann = None
        self.kv_store = None
        if kv_store is not None:
            self.attach_kv_store(kv_store)

    def attach_kv_store(self, store) -> "Retriever":
        """Read the retrieved passages' K/V from `store` (built over the whole knowledge source)."""
        from .kv_store import KVStoreError

        n_source = len(self.tokens) if self.rows is None else None
        if store.l_max != self.l_max:
            raise KVStoreError(f"the passage K/V store has l_max {store.l_max}, the corpus {self.l_max}")
        if n_source is not None and store.n != n_source:
            raise KVStoreError(f"the passage K/V store holds {store.n} passages, the corpus {n_source}")
        if self.rows is not None and len(self.rows) and self.rows[-1] >= store.n:
            raise KVStoreError(f"the passage K/V store holds {store.n} passages, the pool reaches row "
                               f"{int(self.rows[-1])}")
        self.kv_store = store
        return self

    @classmethod
    def build(cls, params, cfg: ModelConfig, tokens, mask, texts=None, *, step: int = 0, batch_size: int = 256,
              mesh=None, backend: str = "exact", progress: bool = False, rows=None):
        """Encode the corpus with the model's bottom group (E_p of every passage) and index it. rows: index only
        these knowledge-source rows of `tokens`/`mask` (an evaluation pool); `texts` stay the whole source's."""
        from ..retrieval import encode_corpus

        if rows is not None:
            rows = np.asarray(rows, np.int64)
            tokens, mask = np.asarray(tokens)[rows], np.asarray(mask)[rows]
        index = encode_corpus(params, cfg, tokens, mask, batch_size=batch_size, mesh=mesh, step=step,
                              keep_tokens=False, progress=progress)
        return cls(index, tokens, mask, texts, backend, rows=rows)

    @classmethod
    def from_kv_store(cls, store, tokens, mask, texts=None, *, backend: str = "exact", step: int = 0, rows=None):
        """The index from the store's E_p (no corpus encoding) and the store attached for reading."""
        from ..retrieval.index import PassageIndex

        emb = store.embeddings()
        if rows is not None:
            rows = np.asarray(rows, np.int64)
            emb, tokens, mask = emb[rows], np.asarray(tokens)[rows], np.asarray(mask)[rows]
        return cls(PassageIndex.create(emb, step=step), tokens, mask, texts, backend, rows=rows, kv_store=store)

    @classmethod
    def build_sharded(cls, params, cfg: ModelConfig, n_passages: int, tokenize: Callable, texts=None, *, mesh,
                      l_max: int, step: int = 0, batch_size: int = 256, backend: str = "exact", rows=None):
        """`build` for a multi-process run: the index on the global `mesh`, each process tokenizing
        (`tokenize(source_rows) -> (tokens, mask)`) and encoding only the index rows its devices hold
        (`retrieval.encode.encode_corpus_sharded`). rows: index only these knowledge-source rows (a pool).
        Every process calls it together; the result is the same global index on each."""
        from ..retrieval.encode import encode_corpus_sharded

        if rows is not None:
            rows = np.asarray(rows, np.int64)
        n = n_passages if rows is None else len(rows)

        def rows_tokens(ix):
            return tokenize(ix if rows is None else rows[ix])

        index = encode_corpus_sharded(params, cfg, n, rows_tokens, mesh=mesh, l_max=l_max, batch_size=batch_size,
                                      step=step, keep_tokens=True)
        return cls(index, None, None, texts, backend, rows=rows)

    @classmethod
    def from_embeddings(cls, embeddings, tokens, mask, texts=None, *, backend: str = "exact", step: int = 0):
        from ..retrieval.index import PassageIndex

        return cls(PassageIndex.create(np.asarray(embeddings), step=step), tokens, mask, texts, backend)

    @property
    def n(self) -> int:
        return self.index.n

    @property
    def l_max(self) -> int:
        return int((self.tokens if self.tokens is not None else self.index.tokens).shape[1])

    def search(self, e_q, k: int):
        """(scores [Q, min(k, N)] f32, ids [Q, min(k, N)] int32), best first."""
        k = min(k, self.index.n)
        if self.backend == "scann":
            if jax.process_count() > 1:
                raise ValueError("the scann backend searches one host's copy of the index; a multi-process "
                                 "evaluation uses a device backend (exact, binned, approx)")
            if self._scann is None:
                from ..retrieval.scann_backend import build_searcher

                self._scann = build_searcher(self.index, k)
            scores, ids = self._scann.search(np.asarray(e_q, np.float32), k)
        else:
            scores, ids = _device_search(self.index, jnp.asarray(e_q), k, self.backend)
        scores, ids = to_host(scores), to_host(ids)
        if self.rows is not None:
            ids = np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)
        return scores, ids

    def gather(self, ids: np.ndarray):
        """Token ids / mask [B, k, l_max] of the passages `ids` [B, k] (-1: an empty, fully masked slot)."""
        ids = np.asarray(ids)
        if self.rows is not None:
            local = np.searchsorted(self.rows, np.maximum(ids, 0))
            local = np.minimum(local, len(self.rows) - 1)
            if np.any((ids >= 0) & (self.rows[local] != ids)):
                raise ValueError("gather: a passage outside the retriever's pool")
            ids = np.where(ids >= 0, local, -1)
        if self.tokens is None:  # the index's device-resident tokens (a multi-process index)
            t, m = _device_gather(self.index, jnp.asarray(ids, jnp.int32))
            return to_host(t), to_host(m)
        safe = np.maximum(ids, 0)
        t, m = self.tokens[safe], self.mask[safe] * (ids >= 0)[..., None]
        return t, m


def answer(params, cfg: ModelConfig, retriever: Retriever, tokens, mask, *, k: int, max_new_tokens: int,
           stop_ids, pad_id: int, search_k: int = 10, use_score_bias: bool = False):
    """Two-stage inference for a batch of right- or left-padded prompts [B, L]. With a `retriever.kv_store` the
    passages' K/V are loaded from the store instead of computed.

    Returns (outputs: generated ids per prompt, ids [B, max(k, search_k)], scores [B, max(k, search_k)]).
    """
    enc = encode(params, cfg, prompts_from_batch(tokens, mask), pad_id=pad_id, max_new_tokens=max_new_tokens)
    scores, ids = retriever.search(enc.e_q, max(k, search_k, 1))
    outs = _read_top(params, cfg, enc, retriever, ids, scores, k, stop_ids, use_score_bias)
    return outs, ids, scores


def _read_top(params, cfg, enc, retriever, ids, scores, k, stop_ids, use_score_bias):
    k = min(k, ids.shape[1])
    if k == 0:
        return read_and_generate(params, cfg, enc, stop_ids=stop_ids)
    pt, pm = retriever.gather(ids[:, :k])
    pkv = None if retriever.kv_store is None else retriever.kv_store.load(ids[:, :k], cfg)
    return read_and_generate(params, cfg, enc, pt, pm, stop_ids=stop_ids, scores=scores[:, :k],
                             use_score_bias=use_score_bias, pkv=pkv)


# ------------------------------------------------------------------------------------------------ evaluation
_TEXTS: Dict[str, List[str]] = {}


def passage_texts(data_dir: str) -> List[str]:
    """Every passage of `data_dir/passages.jsonl` as "title: text" (what answer recall searches), cached."""
    import json

    from ..data import paths

    if data_dir not in _TEXTS:
        with paths.open(paths.join(data_dir, "passages.jsonl")) as f:
            objs = [json.loads(line) for line in f if line.strip()]
        _TEXTS[data_dir] = [f"{o.get('title', '')}: {o['text']}" for o in objs]
    return _TEXTS[data_dir]


TRUE_FALSE_TASKS = ("fact_verification", "scifact", "fever", "fev")


def is_true_false(task: str, answers: Sequence[str]) -> bool:
    return task in TRUE_FALSE_TASKS or (bool(answers) and
                                        set(M.normalize_answer(a) for a in answers) <= {"true", "false"})


def _ks_for(mode: str, ks: Sequence[int]) -> List[int]:
    if mode == "closed_book":
        return [0]
    ks = sorted(set(int(k) for k in ks))
    if not ks or min(ks) < 1:
        raise ValueError(f"mode {mode!r} reads k >= 1 passages, got k={list(ks)}")
    return ks


def evaluate_modes(params, cfg: ModelConfig, data_dir: str, task: str, tokenizer, retriever: Optional[Retriever], *,
                   mode: str = "imprag", ks: Sequence[int] = (1,), split: str = "dev", L_q: int = 64,
                   l_max: int = 32, max_new_tokens: int = 8, batch_size: int = 64, limit: Optional[int] = None,
                   use_score_bias: bool = False, add_bos: bool = True, keep_predictions: int = 0,
                   progress: Optional[Callable[[int], None]] = None, predictions: Optional[list] = None) -> List[Dict]:
    """Evaluate one task split in one mode for every k in `ks` (one row per k) in a single pass over the data.

    mode: "imprag" (retrieve with the model's own E_q, read the top k), "closed_book" (no passages; ks ignored),
    "oracle" (the first k gold passages), "bm25" (the stored BM25 top k, e.g. the RA-IT baseline's reading).
    Recall@1/5/10 is that of the model's retrieval (imprag) or of the stored BM25 ranking (bm25); gold recall is
    over the examples with a gold passage (`n_gold` of `n`), and so are oracle answers (`NoGoldError` when no
    example has one).
    `progress(n)` is called after each batch with its number of examples; `predictions`, when a list, receives
    one dict per example and k.
    """
    from ..data.pipeline import eval_batches

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if mode == "imprag" and retriever is None:
        raise ValueError("mode 'imprag' needs a Retriever")
    ks = _ks_for(mode, ks)
    kmax = max(ks)
    if mode == "oracle":
        n_all, n_with = gold_counts(data_dir, task, split, limit)
        if n_all and not n_with:
            raise NoGoldError(f"mode 'oracle' reads the gold passages, but none of the {n_all} examples of "
                              f"{task}.{split} has one (no provenance the knowledge source holds)")
    n_total = n_gold = 0
    source = {"imprag": "none", "closed_book": "none", "oracle": "gold", "bm25": "pseudo"}[mode]
    k_fetch = max(kmax, max(RECALL_KS)) if mode == "bm25" else max(kmax, 1)
    stop = tokenizer.stop_ids
    texts = None
    if mode in ("imprag", "bm25"):
        texts = retriever.texts if retriever is not None and retriever.texts is not None else passage_texts(data_dir)
    rows: Dict[int, List[Dict]] = {k: [] for k in ks}
    for batch in eval_batches(data_dir, task, split, tokenizer, batch_size=batch_size, L_q=L_q, passages=source,
                              k=k_fetch, l_max=l_max, add_bos=add_bos, limit=limit):
        valid = np.nonzero(batch["valid"] > 0)[0]
        if len(valid) == 0:
            continue
        enc = encode(params, cfg, prompts_from_batch(batch["tokens"], batch["mask"]), pad_id=tokenizer.pad_id,
                     max_new_tokens=max_new_tokens)
        ids = scores = None
        if mode == "imprag":
            scores, ids = retriever.search(enc.e_q, max(kmax, max(RECALL_KS)))
        elif mode == "bm25":
            ids = batch["passage_ids"]
        outs = {}
        for k in ks:
            if mode == "imprag":
                outs[k] = _read_top(params, cfg, enc, retriever, ids, scores, k, stop, use_score_bias)
            elif mode == "closed_book":
                outs[k] = read_and_generate(params, cfg, enc, stop_ids=stop)
            else:
                outs[k] = read_and_generate(params, cfg, enc, batch["passages"][:, :k], batch["passage_mask"][:, :k],
                                            stop_ids=stop)
        for i in valid:
            ans = batch["answers"][i]
            tf = is_true_false(task, ans)
            base = {}
            gold = [int(g) for g in batch["gold_ids"][i] if int(g) >= 0]
            n_total += 1
            n_gold += bool(gold)
            if mode == "oracle" and not gold:  # nothing to read: oracle answers are over the examples with gold
                continue
            if ids is not None:
                r = [int(x) for x in ids[i] if int(x) >= 0]
                for kk in RECALL_KS:
                    if gold:
                        base[f"gold_recall@{kk}"] = M.gold_in_topk(r, gold, kk)
                    if not tf:
                        base[f"answer_recall@{kk}"] = M.answer_in_passages([texts[j] for j in r[:kk]], ans, kk)
                base["retrieved"] = r[:max(RECALL_KS)]
            for k in ks:
                pred = tokenizer.decode(outs[k][i]).strip()
                row = {"id": batch["ids"][i], "prediction": pred, "answers": ans, "em": M.exact_match(pred, ans),
                       "f1": M.f1_score(pred, ans), **base}
                if tf:
                    row["accuracy"] = M.accuracy_true_false(pred, ans)
                rows[k].append(row)
                if predictions is not None:
                    predictions.append({"task": task, "mode": mode, "k": k, **row})
        if progress is not None:
            progress(len(valid))
    with_gold = (n_total, n_gold) if mode in ("imprag", "bm25", "oracle") else None
    return [_summary(rows[k], task, split, mode, k, keep_predictions, with_gold) for k in ks]


class NoGoldError(ValueError):
    """Oracle reading asked of a task split whose examples have no gold passage."""


def gold_counts(data_dir: str, task: str, split: str, limit: Optional[int] = None):
    """(examples, examples with a gold passage) of a task split (its first `limit`), from the record file."""
    from ..data.pipeline import gold_counts as counts

    return counts(data_dir, task, split, limit)


def _summary(rows: List[Dict], task: str, split: str, mode: str, k: int, keep_predictions: int,
             with_gold=None) -> Dict:
    """One result row. with_gold = (examples, examples with a gold passage) for the modes whose numbers depend on
    gold: `n` is then every example, `n_gold` those with gold, over which gold recall (every key present, None
    when no example has gold) and oracle answers are averaged."""
    out: Dict = {"task": task, "split": split, "mode": mode, "k": k, "n": len(rows)}
    keys = [key for key in ("em", "f1", "accuracy") if any(key in r for r in rows)]
    keys += sorted({key for r in rows for key in r if "recall@" in key},
                   key=lambda s: (s.split("@")[0], int(s.split("@")[1])))
    if with_gold is not None:
        out["n"], out["n_gold"] = int(with_gold[0]), int(with_gold[1])
        if mode != "oracle":
            keys += [f"gold_recall@{kk}" for kk in RECALL_KS if f"gold_recall@{kk}" not in keys]
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(vals)) if vals else None
    if keep_predictions:
        out["examples"] = [{k2: r[k2] for k2 in ("id", "prediction", "answers", "em")} for r in rows[:keep_predictions]]
    return out


def evaluate_task(params, cfg: ModelConfig, data_dir: str, task: str, tokenizer, retriever: Optional[Retriever], *,
                  split: str = "dev", mode: str = "imprag", k: int = 1, L_q: int = 64, l_max: int = 32,
                  max_new_tokens: int = 8, batch_size: int = 64, limit: Optional[int] = None,
                  use_score_bias: bool = False, keep_predictions: int = 0, add_bos: bool = True) -> Dict:
    """EM / F1 (/ accuracy for true-false tasks) and recall@1/5/10 for one task split, one mode, one k.

    mode: "imprag" (retrieve with the model's own embeddings, read the top k), "closed_book" (no passages),
    "oracle" (the gold passages), "bm25" (the stored BM25 top k).
    """
    ks = [0] if mode == "closed_book" else [max(int(k), 1)]
    return evaluate_modes(params, cfg, data_dir, task, tokenizer, retriever, mode=mode, ks=ks, split=split, L_q=L_q,
                          l_max=l_max, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                          use_score_bias=use_score_bias, add_bos=add_bos, keep_predictions=keep_predictions)[0]
