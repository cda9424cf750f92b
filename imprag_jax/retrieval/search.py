"""Maximum-inner-product search over a device-resident passage index, callable inside `jax.jit`.

    scores, ids = search(index, E_q, k, backend="exact" | "binned" | "approx")   # [Q, k] f32, [Q, k] int32

When the index rows are sharded over a mesh the search runs under `jax.shard_map`: every shard scores its rows
(fp32 accumulation of `E_q` cast to the index dtype), takes a local top-k, the `(score, global id)` candidates of
all shards are all-gathered and a global top-k picks the answer.  Padding rows (the index pads N up to a multiple
of the device count) get score -inf and id -1; so do the surplus slots when N < k.

Backends (the local top-k; the global merge is always exact):
  * `exact`  -- `lax.top_k` over all scores.
  * `binned` -- partial reduce: the scores of a shard are split into `num_bins` strided bins (row r is in bin
                r mod num_bins, so neighbouring rows -- passages of one article -- land in different bins), the
                max of each bin (and its argmax) is kept, then an exact top-k over the bin winners.  A true top-k
                row is lost only when a better top-k row shares its bin: for rank r that happens with
                probability ~(r-1)/num_bins, so mean recall@k ~ 1 - (k-1)/(2*num_bins).
                `default_num_bins` sizes the bins from k and `recall_target` (0.99 -> 512 bins for k = 10).
                One pass over the scores; on GPU it runs at matmul speed where `approx_max_k` sorts.
  * `approx` -- `lax.approx_max_k(recall_target=...)`: the TPU partial-reduce kernel (exact sort on CPU/GPU).

`score_all(index, E_q)` returns the full score matrix (the matmul alone: the reference the backends are timed
against in `benchmarks/retrieval.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from imprag_jax.retrieval.index import PassageIndex

BACKENDS = ("exact", "binned", "approx")
DEFAULT_RECALL = {"binned": 0.99, "approx": 0.95}
NEG_INF = -jnp.inf


def default_num_bins(n_rows: int, k: int, recall_target: float = 0.99) -> int:
    """Bins for the `binned` backend over `n_rows` rows (per shard) so that the expected recall@k is about
    `recall_target` on scores in random order: num_bins >= (k-1) / (2 (1 - recall_target)), at least 4k, rounded
    up to a multiple of 128.  Returns 0 (= do an exact top-k) when the bins would hold fewer than 2 rows."""
    if not 0.0 < recall_target < 1.0:
        raise ValueError(f"recall_target must be in (0, 1), got {recall_target}")
    b = max(4 * k, math.ceil((k - 1) / (2.0 * (1.0 - recall_target))), 128)
    b = -(-b // 128) * 128
    return b if 2 * b <= n_rows else 0


# ------------------------------------------------------------------------------------------ local top-k kernels
def _binned_topk(s: jax.Array, k: int, num_bins: int) -> Tuple[jax.Array, jax.Array]:
    """Top-k of s [Q, n] over the maxima of `num_bins` strided bins (plus the n mod num_bins tail rows)."""
    q, n = s.shape
    per_bin = n // num_bins
    main = per_bin * num_bins
    s3 = s[:, :main].reshape(q, per_bin, num_bins)
    pos = lax.broadcasted_iota(jnp.int32, s3.shape, 1)

    def better(a, b):
        (av, ai), (bv, bi) = a, b
        take_a = (av > bv) | ((av == bv) & (ai < bi))
        return jnp.where(take_a, av, bv), jnp.where(take_a, ai, bi)

    bin_max, bin_arg = lax.reduce((s3, pos), (jnp.array(-jnp.inf, s.dtype), jnp.array(0, jnp.int32)), better, (1,))
    cand_ids = bin_arg * num_bins + jnp.arange(num_bins, dtype=jnp.int32)[None, :]
    if main < n:  # the tail rows are candidates of their own
        bin_max = jnp.concatenate([bin_max, s[:, main:]], axis=1)
        tail = jnp.broadcast_to(jnp.arange(main, n, dtype=jnp.int32)[None, :], (q, n - main))
        cand_ids = jnp.concatenate([cand_ids, tail], axis=1)
    v, j = lax.top_k(bin_max, k)
    return v, jnp.take_along_axis(cand_ids, j, axis=1)


def _local_topk(s, k, backend, num_bins, recall_target, reduction_size):
    if backend == "exact" or (backend == "binned" and not num_bins):
        return lax.top_k(s, k)
    if backend == "binned":
        return _binned_topk(s, k, num_bins)
    if backend == "approx":
        return lax.approx_max_k(s, k, recall_target=recall_target,
                                reduction_input_size_override=reduction_size)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _shard_search(q, e, *, k, backend, n, row_axes, num_bins, recall_target, precision, query_block,
                  n_total_pad):
    """Runs on one shard (or on everything when row_axes is empty): local top-k with global ids, then (sharded)
    all-gather + global top-k."""
    n_local = e.shape[0]
    k_loc = min(k, n_local)
    shard = lax.axis_index(row_axes) if row_axes else 0
    base = shard * n_local

    def one_block(qb):
        s = jnp.dot(qb.astype(e.dtype), e.T, preferred_element_type=jnp.float32, precision=precision)
        if n_total_pad > n:  # padding rows
            gid = base + lax.broadcasted_iota(jnp.int32, (1, n_local), 1)
            s = jnp.where(gid < n, s, NEG_INF)
        v, i = _local_topk(s, k_loc, backend, num_bins, recall_target, n_total_pad)
        ids = (base + i).astype(jnp.int32)
        return v.astype(jnp.float32), jnp.where(ids < n, ids, -1)

    Q = q.shape[0]
    if query_block and Q > query_block:
        nb = -(-Q // query_block)
        qp = jnp.pad(q, ((0, nb * query_block - Q), (0, 0))).reshape(nb, query_block, q.shape[1])
        v, i = lax.map(one_block, qp)
        v, i = v.reshape(-1, k_loc)[:Q], i.reshape(-1, k_loc)[:Q]
    else:
        v, i = one_block(q)
    if row_axes:
        v = lax.all_gather(v, row_axes, axis=1, tiled=True)
        i = lax.all_gather(i, row_axes, axis=1, tiled=True)
    if v.shape[1] < k:  # N < k: pad the candidates
        extra = k - v.shape[1]
        v = jnp.pad(v, ((0, 0), (0, extra)), constant_values=-jnp.inf)
        i = jnp.pad(i, ((0, 0), (0, extra)), constant_values=-1)
    if row_axes or v.shape[1] > k:
        v, j = lax.top_k(v, k)
        i = jnp.take_along_axis(i, j, axis=1)
    return v, i


# ------------------------------------------------------------------------------------------ resolving the index
def _spec_axes(entry) -> Tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _infer_row_sharding(x):
    """(mesh, row_axes) of an array sharded by rows (concrete array, or a tracer under an explicit mesh)."""
    sh = None
    try:
        sh = x.sharding
    except Exception:
        try:
            sh = jax.typeof(x).sharding
        except Exception:
            sh = None
    if isinstance(sh, NamedSharding) and len(sh.spec) > 0:
        axes = _spec_axes(sh.spec[0])
        if axes:
            return sh.mesh, axes
    return None, ()


def _resolve(index_or_arrays, mesh, n_valid, query_fingerprint):
    if isinstance(index_or_arrays, PassageIndex):
        idx = index_or_arrays
        if query_fingerprint is not None and query_fingerprint != idx.config_hash:
            raise ValueError(
                f"query embedding fingerprint {query_fingerprint!r} does not match the index's config_hash "
                f"{idx.config_hash!r}: the index was built with another model configuration (layer b, RoPE "
                f"mode, dimensions...); rebuild it with encode_corpus() under the current config")
        emb, n = idx.embeddings, idx.n
        m = idx.mesh if mesh is None else mesh
        axes = tuple(m.axis_names) if m is not None else ()
        return emb, n, m, axes
    if isinstance(index_or_arrays, dict):
        emb = index_or_arrays["embeddings"]
        n_valid = index_or_arrays.get("n", n_valid)
    else:
        emb = index_or_arrays
    n = int(n_valid) if n_valid is not None else int(emb.shape[0])
    if mesh is not None:
        return emb, n, mesh, tuple(mesh.axis_names)
    m, axes = _infer_row_sharding(emb)
    return emb, n, m, axes


def search(index_or_arrays, E_q, k: int, backend: str = "exact", *, query_fingerprint: Optional[str] = None,
           mesh=None, n_valid: Optional[int] = None, num_bins: Optional[int] = None,
           recall_target: Optional[float] = None, precision=None,
           query_block: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Top-k maximum-inner-product search.

    Args:
      index_or_arrays: a `PassageIndex`, a dict `{"embeddings": [N, D], "n": valid rows}` or an array `[N, D]`.
        A raw array is searched under `shard_map` when `mesh=` is given (rows over all its axes) or when the
        array is itself row-sharded by a `NamedSharding`.
      E_q: query embeddings `[Q, D]` (any float dtype; cast to the index dtype, accumulated in fp32).
      k: neighbours per query.
      backend: "exact" | "binned" | "approx".
      query_fingerprint: the `config_hash` of the model config that produced `E_q`; a mismatch with the index's
        raises `ValueError`.
      n_valid: number of real rows of a raw array (rows past it are ignored).
      num_bins: bins per shard for "binned" (default `default_num_bins(rows per shard, k, recall_target)`).
      recall_target: for "binned" (default 0.99) and "approx" (default 0.95).
      precision: `lax.Precision` of the score matmul (default: the backend's default).
      query_block: score at most this many queries at once (bounds the [Q, rows] score buffer).

    Returns: (scores [Q, k] float32, ids [Q, k] int32), best first; -inf / -1 past the end of a small index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    emb, n, m, row_axes = _resolve(index_or_arrays, mesh, n_valid, query_fingerprint)
    if E_q.ndim != 2:
        raise ValueError(f"E_q must be [Q, D], got shape {E_q.shape}")
    D = emb.shape[1]
    if E_q.shape[1] != D:
        raise ValueError(f"query embedding dimension {E_q.shape[1]} does not match the index dimension {D} "
                         f"(D = n_kv_heads * head_dim of the model that built it)")
    rt = recall_target if recall_target is not None else DEFAULT_RECALL.get(backend, 0.95)
    n_shards = math.prod(m.shape[a] for a in row_axes) if row_axes else 1
    n_rows = emb.shape[0]
    n_pad = -(-n_rows // n_shards) * n_shards
    if n_pad != n_rows:  # a raw array whose rows do not split evenly
        emb = jnp.pad(emb, ((0, n_pad - n_rows), (0, 0)))
    n = min(n, n_rows)
    n_local = n_pad // n_shards
    nb = 0
    if backend == "binned":
        nb = num_bins if num_bins is not None else default_num_bins(n_local, min(k, n_local), rt)
        if nb and nb > n_local:
            nb = 0
    fn = functools.partial(_shard_search, k=k, backend=backend, n=n, row_axes=row_axes, num_bins=nb,
                           recall_target=rt, precision=precision, query_block=query_block, n_total_pad=n_pad)
    if not row_axes:
        return fn(E_q, emb)
    sm = jax.shard_map(fn, mesh=m, in_specs=(P(), P(row_axes, None)), out_specs=(P(), P()), check_vma=False)
    return sm(E_q, emb)


def score_all(index_or_arrays, E_q, *, mesh=None, precision=None) -> jax.Array:
    """The scores of every row `[Q, N_padded]` (fp32; sharded by columns like the index rows): the matmul the
    search backends start from.  Padding columns hold garbage (zeros); slice `[:, :index.n]`."""
    emb, n, m, row_axes = _resolve(index_or_arrays, mesh, None, None)

    def mm(q, e):
        return jnp.dot(q.astype(e.dtype), e.T, preferred_element_type=jnp.float32, precision=precision)

    if not row_axes:
        return mm(E_q, emb)
    return jax.shard_map(mm, mesh=m, in_specs=(P(), P(row_axes, None)), out_specs=P(None, row_axes),
                         check_vma=False)(E_q, emb)


def brute_force_numpy(db: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Reference exact search in numpy (fp32): (scores [Q, k], ids [Q, k]), ties broken by lower id."""
    s = np.asarray(queries, np.float32) @ np.asarray(db, np.float32).T
    k_ = min(k, s.shape[1])
    part = np.argpartition(-s, k_ - 1, axis=1)[:, :k_]
    ps = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -ps), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(s, ids, axis=1), ids.astype(np.int32)


def recall_at_k(ids: np.ndarray, ref_ids: np.ndarray, k: Optional[int] = None) -> float:
    """Mean |ids[:, :k] ∩ ref_ids[:, :k]| / k over queries."""
    ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
    k = k or ref_ids.shape[1]
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(ids, ref_ids)]
    return float(np.mean(hits)) / k
