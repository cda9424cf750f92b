"""Maximum-inner-product search over a device-resident passage index, callable inside `jax.jit`.

    scores, ids = search(index, E_q, k, backend="exact" | "binned" | "approx")   # [Q, k] f32, [Q, k] int32

When the index rows are sharded over a mesh the search runs under `jax.shard_map`: every shard scores its rows
(fp32 accumulation of `E_q` cast to the index dtype), takes a local top-k, the `(score, global id)` candidates of
all shards are all-gathered and a global top-k picks the answer.  Padding rows (the index pads N up to a multiple
of the device count with zero rows) never come back; the surplus slots when N < k hold score -inf and id -1.

Backends (the local top-k; the global merge is always exact):
  * `exact`  -- `lax.top_k` over all scores.
  * `binned` -- partial reduce: the scores of a shard are split into `num_bins` strided bins (row r is in bin
                r mod num_bins, so neighbouring rows -- passages of one article -- land in different bins), a
                single max-reduce keeps each bin's best score, an exact top-k picks the k best bins and an argmax
                over just those k bins finds their rows.  A true top-k row is lost only when a better top-k row
                shares its bin: for rank r that happens with probability ~(r-1)/num_bins, so mean recall@k ~
                1 - (k-1)/(2*num_bins).  `default_num_bins` sizes the bins from k and `recall_target` (0.99 ->
                512 for k = 10); `pick_bins` moves that to a divisor of the shard's row count when one is near,
                so the scores reshape into bins without a copy.  One pass over the scores: on GPU it runs at
                matmul speed where `approx_max_k` falls back to a full sort.
  * `approx` -- `lax.approx_max_k(recall_target=...)`: the TPU partial-reduce kernel (exact sort on CPU/GPU).

`score_all(index, E_q)` returns the full score matrix (the matmul alone: the reference the backends are timed
against in `benchmarks/retrieval.py`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

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
def pick_bins(n_rows: int, target: int) -> int:
    """The bin count actually used on a shard of `n_rows` rows: a divisor of n_rows in [target, 4 target]
    (multiples of 128 first), so that the scores reshape into bins without a tail; else `target` (the
    n_rows mod target tail rows then become candidates of their own, at the cost of a copy of the scores)."""
    if not target or n_rows % target == 0:
        return target
    hi = min(4 * target, n_rows // 2)
    for step in (128, 8, 1):
        for b in range(-(-target // step) * step, hi + 1, step):
            if n_rows % b == 0:
                return b
    return target


def _binned_topk(s: jax.Array, k: int, num_bins: int) -> Tuple[jax.Array, jax.Array]:
    """Top-k of s [Q, n] over the maxima of `num_bins` strided bins (plus the n mod num_bins tail rows).

    One single-output max-reduce over the scores (the cheapest reduction on every backend), an exact top-k over
    the bin maxima, then the winning row of each of the k chosen bins is found by an argmax over just those k
    bins (a [Q, n/num_bins, k] gather: tiny)."""
    q, n = s.shape
    per_bin = n // num_bins
    main = per_bin * num_bins
    if main == n:
        s3 = s.reshape(q, per_bin, num_bins)  # row r = i * num_bins + b is in bin b
        v, j = lax.top_k(jnp.max(s3, axis=1), k)
        cols = jnp.take_along_axis(s3, j[:, None, :], axis=2)  # [Q, per_bin, k]
        within = jnp.argmax(cols, axis=1).astype(jnp.int32)  # first max: the lowest row on ties
        return v, (within * num_bins + j).astype(jnp.int32)
    # a tail: the rows past the last full bin are candidates of their own (slicing s costs a copy)
    s3 = s[:, :main].reshape(q, per_bin, num_bins)
    cand = jnp.concatenate([jnp.max(s3, axis=1), s[:, main:]], axis=1)
    v, j = lax.top_k(cand, k)
    jb = jnp.minimum(j, num_bins - 1)
    cols = jnp.take_along_axis(s3, jb[:, None, :], axis=2)
    within = jnp.argmax(cols, axis=1).astype(jnp.int32)
    rows = jnp.where(j < num_bins, within * num_bins + j, main + (j - num_bins))
    return v, rows.astype(jnp.int32)


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
                  n_total_pad, zero_padded):
    """Runs on one shard (or on everything when row_axes is empty): local top-k with global ids, then (sharded)
    all-gather + global top-k.

    Rows >= n are padding.  When they are known to be zero (a PassageIndex, or rows padded here) they score
    exactly 0, so instead of masking the whole [Q, rows] score matrix (an extra pass over it) the local top-k
    takes `extra` more candidates (extra = padding rows on one shard, < the device count for a PassageIndex)
    and drops the padding ids from that small result: still exact for "exact"; for "binned" a zero row can
    only take the place of a bin winner scoring below 0.  Otherwise the scores are masked with -inf."""
    n_local = e.shape[0]
    pad_total = n_total_pad - n
    mask_scores = pad_total > 0 and not zero_padded
    extra = min(pad_total, n_local) if (pad_total > 0 and zero_padded) else 0
    n_cand = n_local if backend != "binned" or not num_bins else num_bins + n_local % num_bins
    k_loc = min(k + extra, n_cand)
    k_out = min(k, k_loc)
    shard = lax.axis_index(row_axes) if row_axes else 0
    base = shard * n_local

    def one_block(qb):
        s = jnp.dot(qb.astype(e.dtype), e.T, preferred_element_type=jnp.float32, precision=precision)
        if mask_scores:
            gid = base + lax.broadcasted_iota(jnp.int32, (1, n_local), 1)
            s = jnp.where(gid < n, s, NEG_INF)
        v, i = _local_topk(s, k_loc, backend, num_bins, recall_target, n_total_pad)
        ids = (base + i).astype(jnp.int32)
        valid = ids < n
        v = jnp.where(valid, v.astype(jnp.float32), NEG_INF)
        ids = jnp.where(valid, ids, -1)
        if k_out < k_loc:  # drop the padding candidates
            v, j = lax.top_k(v, k_out)
            ids = jnp.take_along_axis(ids, j, axis=1)
        return v, ids

    Q = q.shape[0]
    if query_block and Q > query_block:
        nb = -(-Q // query_block)
        qp = jnp.pad(q, ((0, nb * query_block - Q), (0, 0))).reshape(nb, query_block, q.shape[1])
        v, i = lax.map(one_block, qp)
        v, i = v.reshape(-1, k_out)[:Q], i.reshape(-1, k_out)[:Q]
    else:
        v, i = one_block(q)
    if row_axes:
        v = lax.all_gather(v, row_axes, axis=1, tiled=True)
        i = lax.all_gather(i, row_axes, axis=1, tiled=True)
    if v.shape[1] < k:  # N < k: pad the candidates
        more = k - v.shape[1]
        v = jnp.pad(v, ((0, 0), (0, more)), constant_values=-jnp.inf)
        i = jnp.pad(i, ((0, 0), (0, more)), constant_values=-1)
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


def _is_passage_index(x) -> bool:
    """A `retrieval.index.PassageIndex` (checked by its fields: index.py imports this module for its `search`
    method, so this module does not import index.py)."""
    return all(hasattr(x, a) for a in ("embeddings", "n", "config_hash", "mesh"))


def _resolve(index_or_arrays, mesh, n_valid, query_fingerprint):
    if _is_passage_index(index_or_arrays):
        idx = index_or_arrays
        if query_fingerprint is not None and query_fingerprint != idx.config_hash:
            raise ValueError(
                f"query embedding fingerprint {query_fingerprint!r} does not match the index's config_hash "
                f"{idx.config_hash!r}: the index was built with another model configuration (layer b, RoPE "
                f"mode, dimensions...); rebuild it with encode_corpus() under the current config")
        emb, n = idx.embeddings, idx.n
        m = idx.mesh if mesh is None else mesh
        axes = tuple(m.axis_names) if m is not None else ()
        return emb, n, m, axes, True
    if isinstance(index_or_arrays, dict):
        emb = index_or_arrays["embeddings"]
        n_valid = index_or_arrays.get("n", n_valid)
    else:
        emb = index_or_arrays
    n = int(n_valid) if n_valid is not None else int(emb.shape[0])
    zero_padded = n >= emb.shape[0]  # rows past n_valid of a raw array may hold anything
    if mesh is not None:
        return emb, n, mesh, tuple(mesh.axis_names), zero_padded
    m, axes = _infer_row_sharding(emb)
    return emb, n, m, axes, zero_padded


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
    emb, n, m, row_axes, zero_padded = _resolve(index_or_arrays, mesh, n_valid, query_fingerprint)
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
        nb = num_bins if num_bins is not None else pick_bins(n_local, default_num_bins(n_local, min(k, n_local), rt))
        if nb and nb > n_local:
            nb = 0
    fn = functools.partial(_shard_search, k=k, backend=backend, n=n, row_axes=row_axes, num_bins=nb,
                           recall_target=rt, precision=precision, query_block=query_block, n_total_pad=n_pad,
                           zero_padded=zero_padded)
    if not row_axes:
        return fn(E_q, emb)
    E_q = _replicated(E_q)
    sm = jax.shard_map(fn, mesh=m, in_specs=(P(), P(row_axes, None)), out_specs=(P(), P()), check_vma=False)
    return sm(E_q, emb)


def _replicated(x):
    """Under an explicit-axes mesh (`jax.set_mesh`) a batch-sharded E_q must be resharded explicitly before it
    enters shard_map replicated (the queries are tiny: [Q, D])."""
    try:
        sh = jax.typeof(x).sharding
    except Exception:
        return x
    spec = getattr(sh, "spec", None)
    if spec is not None and any(e is not None for e in spec):
        return jax.reshard(x, P())
    return x


def score_all(index_or_arrays, E_q, *, mesh=None, precision=None) -> jax.Array:
    """The scores of every row `[Q, N_padded]` (fp32; sharded by columns like the index rows): the matmul the
    search backends start from.  Padding columns hold garbage (zeros); slice `[:, :index.n]`."""
    emb, n, m, row_axes, _ = _resolve(index_or_arrays, mesh, None, None)

    def mm(q, e):
        return jnp.dot(q.astype(e.dtype), e.T, preferred_element_type=jnp.float32, precision=precision)

    if not row_axes:
        return mm(E_q, emb)
    E_q = _replicated(E_q)
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
