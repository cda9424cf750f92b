"""Corpus encoding: passage tokens -> `PassageIndex`.

`encode_corpus` runs only the bottom group of the model (`imprag_jax.model.passage_embedding`: layers 0..b-1 and
layer b's key projection), jitted once for a fixed batch shape (the last batch is padded), the batch sharded over
the mesh's batch axes ("data", "fsdp" when present, else every axis).  With `progress`, a tqdm bar shows it on a
terminal (none in a redirected log); the passages/s figure is logged at the end (and returned through `stats=`).

With `chunk_dir`, the embeddings of every `chunk_size` passages are written as `chunk_XXXXXX.npy` (fp32) as soon
as they are done; a second call with the same inputs (same model fingerprint, step, corpus checksum and chunk
size -- recorded in `chunk_dir/chunks.json`) loads the finished chunks and encodes only the rest, so an
interrupted run resumes where it stopped.  Chunks written for other inputs are discarded with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from imprag_jax.retrieval.index import (PassageIndex, auto_mesh, config_fingerprint, embedding_fingerprint,
                                        padded_rows, row_spec)

log = logging.getLogger(__name__)

CHUNK_META = "chunks.json"
BATCH_AXES = ("data", "fsdp")


def corpus_checksum(tokens: np.ndarray, mask: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (tokens, mask):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _batch_axes(mesh) -> tuple:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes if axes else tuple(mesh.axis_names)


def _resolve_fingerprint(cfg, fingerprint) -> str:
    if fingerprint is None:
        return embedding_fingerprint(cfg)
    if isinstance(fingerprint, Mapping):
        return config_fingerprint(fingerprint)
    return str(fingerprint)


def _on_mesh(params, mesh):
    """Replicate parameter leaves that do not already live on the mesh's devices."""
    devs = set(mesh.devices.flat)
    rep = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and set(x.sharding.device_set) == devs:
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(put, params)


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


_JITTED: dict = {}


def _jitted_embed(cfg, embed_fn, out_sh):
    """One jitted batch function per (config, embed_fn, output sharding): a second call (an index refresh)
    reuses the executable instead of tracing and compiling again."""
    key = (cfg, embed_fn, out_sh)
    if key not in _JITTED:
        def embed(p, t, m):
            out = embed_fn(p, cfg, t, m)
            e = out[0] if isinstance(out, (tuple, list)) else out
            return e.astype(jnp.float32)

        _JITTED[key] = jax.jit(embed, out_shardings=out_sh) if out_sh is not None else jax.jit(embed)
    return _JITTED[key]


def encode_corpus(params, cfg, tokens, mask, *, batch_size: int = 64, mesh=None,
                  chunk_dir: Optional[str] = None, chunk_size: int = 8192, step: int = 0,
                  fingerprint: Union[str, Mapping[str, Any], None] = None, dtype=jnp.bfloat16,
                  keep_tokens: bool = True, index_mesh=None, embed_fn: Optional[Callable] = None,
                  progress: bool = True, on_chunk: Optional[Callable[[int, int], None]] = None,
                  stats: Optional[dict] = None) -> PassageIndex:
    """Embeds every passage with the bottom group and returns a `PassageIndex`.

    Args:
      params, cfg: model parameters and `ModelConfig`.
      tokens, mask: `[N, l]` passage token ids and validity mask (host arrays; right or left padded).
      batch_size: passages per jitted call (rounded up to a multiple of the batch-axis devices).
      mesh: shard each batch over the mesh's batch axes (params not yet on the mesh are replicated onto it);
        the index rows are then sharded over all of its axes.  None: default device, default index mesh.
      chunk_dir / chunk_size: save finished chunks of `chunk_size` passages (rounded up to a multiple of the
        batch size) and resume from them.
      step: the parameter step recorded in the index.
      fingerprint: `config_hash` of the index: a string, a dict of config fields (hashed with
        `config_fingerprint`) or None = `embedding_fingerprint(cfg)`.
      dtype: embedding dtype stored in the index (bf16 by default).
      keep_tokens: store the token ids and mask in the index (the reader needs them for in-graph retrieval).
      index_mesh: mesh of the index rows (default: `mesh`, else all devices).
      embed_fn: `(params, cfg, tokens, mask) -> E_p` or `(E_p, hidden)`; default `model.passage_embedding`.
      on_chunk: called as `on_chunk(chunk_id, passages_done)` after each chunk is finished (and saved).
      stats: if a dict, filled with {"passages", "encoded", "seconds", "passages_per_s", "resumed_chunks"}.
    """
    if embed_fn is None:
        from imprag_jax.model import passage_embedding as embed_fn
    tokens = np.asarray(tokens)
    mask = np.asarray(mask)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens and mask must both be [N, l]; got {tokens.shape} and {mask.shape}")
    N = tokens.shape[0]
    if N == 0:
        raise ValueError("empty corpus")
    fp = _resolve_fingerprint(cfg, fingerprint)

    # ------------------------------------------------------------------ the jitted batch function
    n_batch_dev = 1
    in_sh = out_sh = None
    if mesh is not None:
        mesh = auto_mesh(mesh)
        axes = _batch_axes(mesh)
        n_batch_dev = math.prod(mesh.shape[a] for a in axes)
        in_sh = NamedSharding(mesh, P(axes, None))
        out_sh = NamedSharding(mesh, P(axes, None))
        params = _on_mesh(params, mesh)
    B = -(-batch_size // n_batch_dev) * n_batch_dev

    if mesh is not None:
        try:  # activation sharding constraints of the model code, when it has them
            from imprag_jax.model.sharding import use_sharding
        except ImportError:  # pragma: no cover
            use_sharding = None
        jitted = _jitted_embed(cfg, embed_fn, out_sh)

        def run(t, m):
            tt = jax.make_array_from_callback(t.shape, in_sh, lambda i: t[i])
            mm = jax.make_array_from_callback(m.shape, in_sh, lambda i: m[i])
            if use_sharding is None:
                return jitted(params, tt, mm)
            with use_sharding(mesh):
                return jitted(params, tt, mm)
    else:
        jitted = _jitted_embed(cfg, embed_fn, None)

        def run(t, m):
            return jitted(params, t, m)

    # ------------------------------------------------------------------ chunks
    cs = N if chunk_dir is None else max(B, -(-chunk_size // B) * B)
    n_chunks = -(-N // cs)
    done: dict = {}
    if chunk_dir is not None:
        done = _prepare_chunks(chunk_dir, {
            "fingerprint": fp, "step": int(step), "n": int(N), "chunk_size": int(cs),
            "corpus": corpus_checksum(tokens, mask)}, n_chunks, cs, N)

    out = [None] * n_chunks
    for c, arr in done.items():
        out[c] = arr
    n_resumed = sum(a.shape[0] for a in done.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        from imprag_jax.cli import stderr_is_terminal

        # none in a redirected log; leave=False: the bar goes when done (the trainer's own bar stays)
        bar = tqdm(total=N, initial=n_resumed, unit="passage", desc="encode_corpus", dynamic_ncols=True,
                   leave=False, mininterval=1.0,
                   disable=jax.process_index() != 0 or not stderr_is_terminal())
    t0 = time.perf_counter()
    n_encoded = 0
    for c in range(n_chunks):
        if out[c] is not None:
            continue
        lo, hi = c * cs, min(N, (c + 1) * cs)
        parts = []
        pending = None  # one batch in flight while the previous one is copied to the host
        for s in range(lo, hi, B):
            e = min(hi, s + B)
            t, m = tokens[s:e], mask[s:e]
            if e - s < B:  # fixed batch shape: pad with copies of the first row (always a valid passage)
                t = np.concatenate([t, np.repeat(t[:1], B - (e - s), axis=0)])
                m = np.concatenate([m, np.repeat(m[:1], B - (e - s), axis=0)])
            res = run(t, m)
            if pending is not None:
                parts.append(_to_host(pending[0])[: pending[1]])
                if bar is not None:
                    bar.update(pending[1])
            pending = (res, e - s)
        parts.append(_to_host(pending[0])[: pending[1]])
        if bar is not None:
            bar.update(pending[1])
        out[c] = np.concatenate(parts).astype(np.float32)
        n_encoded += hi - lo
        if chunk_dir is not None and jax.process_index() == 0:
            path = os.path.join(chunk_dir, f"chunk_{c:06d}.npy")
            tmp = os.path.join(chunk_dir, f".partial_{c:06d}.npy")
            np.save(tmp, out[c])
            os.replace(tmp, path)
        if on_chunk is not None:
            on_chunk(c, hi)
    secs = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rate = n_encoded / secs if n_encoded and secs > 0 else float("nan")
    if n_encoded:
        log.info("encode_corpus: %d passages in %.1fs = %.1f passages/s (%d resumed from %s)",
                 n_encoded, secs, rate, n_resumed, chunk_dir)
    if stats is not None:
        stats.update(passages=N, encoded=n_encoded, seconds=secs, passages_per_s=rate,
                     resumed_chunks=len(done))
    emb = np.concatenate(out)
    return PassageIndex.create(emb, tokens if keep_tokens else None, mask if keep_tokens else None,
                               step=step, config_hash=fp,
                               mesh=index_mesh if index_mesh is not None else mesh, dtype=dtype)


def _prepare_chunks(chunk_dir: str, meta: dict, n_chunks: int, cs: int, N: int) -> dict:
    """Loads the finished chunks that match `meta`; clears chunk_dir of stale ones."""
    os.makedirs(chunk_dir, exist_ok=True)
    meta_path = os.path.join(chunk_dir, CHUNK_META)
    old = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
    names = sorted(f for f in os.listdir(chunk_dir) if f.startswith("chunk_") and f.endswith(".npy"))
    if old != meta:
        if names:
            log.warning("encode_corpus: %s holds chunks of another encoding (%s); discarding them", chunk_dir, old)
            for f in names:
                os.remove(os.path.join(chunk_dir, f))
        if jax.process_index() == 0:
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=1)
        return {}
    done = {}
    for c in range(n_chunks):
        path = os.path.join(chunk_dir, f"chunk_{c:06d}.npy")
        if not os.path.exists(path):
            continue
        rows = min(N, (c + 1) * cs) - c * cs
        try:
            arr = np.load(path)
        except Exception as e:  # a torn file: encode it again
            log.warning("encode_corpus: cannot read %s (%s); re-encoding that chunk", path, e)
            continue
        if arr.shape[0] != rows:
            log.warning("encode_corpus: %s has %d rows, expected %d; re-encoding it", path, arr.shape[0], rows)
            continue
        done[c] = arr
    return done


# ------------------------------------------------------------------------------------------ multi-host encoding
def local_index_rows(n: int, mesh) -> np.ndarray:
    """The index rows (< n, sorted) that this process's devices hold in a `PassageIndex` of n rows on `mesh`
    (rows sharded over every mesh axis): with the usual process-major device order, a contiguous range by
    process index. What this process must tokenize and encode in `encode_corpus_sharded`."""
    mesh = auto_mesh(mesh)
    n_pad = padded_rows(n, mesh)
    per_dev = n_pad // mesh.size
    sh = NamedSharding(mesh, row_spec(mesh))
    starts = sorted({idx[0].start or 0 for idx in sh.addressable_devices_indices_map((n_pad, 1)).values()})
    parts = [np.arange(s, min(s + per_dev, n)) for s in starts]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


def put_local_rows(n: int, rows: np.ndarray, x: np.ndarray, mesh) -> jax.Array:
    """A global `[padded_rows(n), ...]` array row-sharded over `mesh` from this process's share only: `rows` =
    `local_index_rows(n, mesh)` and `x` their values (rows past n are zero). Every process calls it together;
    nothing leaves the process that holds it (e.g. the token ids of a restored index, without tokenizing the rest
    of the corpus)."""
    mesh = auto_mesh(mesh)
    n_pad = padded_rows(n, mesh)
    x = np.asarray(x)
    if len(rows) != len(x):
        raise ValueError(f"{len(x)} values for {len(rows)} rows")

    def part(idx):
        a, b = idx[0].start or 0, idx[0].stop if idx[0].stop is not None else n_pad
        out = np.zeros((b - a,) + x.shape[1:], x.dtype)
        lo, hi = np.searchsorted(rows, [a, min(b, n)])
        out[rows[lo:hi] - a] = x[lo:hi]
        return out

    return jax.make_array_from_callback((n_pad,) + x.shape[1:], NamedSharding(mesh, row_spec(mesh)), part)


def encode_corpus_sharded(params, cfg, n: int, rows_tokens: Callable[[np.ndarray], tuple], *, mesh, l_max: int,
                          batch_size: int = 64, step: int = 0,
                          fingerprint: Union[str, Mapping[str, Any], None] = None, dtype=jnp.bfloat16,
                          keep_tokens: bool = True, embed_fn: Optional[Callable] = None,
                          stats: Optional[dict] = None) -> PassageIndex:
    """A `PassageIndex` of n passages on `mesh` (every process of a multi-process run calls it together) for which
    each process tokenizes and encodes only the rows its own devices hold (`local_index_rows`).

    rows_tokens(rows) -> (tokens [len(rows), l_max], mask): the token ids of the given index rows (this process's
    share only). The encoding runs as one global computation per batch: device q of the mesh encodes
    `ceil(batch_size / devices)` rows of its own block of the index (the index's row sharding, so the inputs never
    leave the process that tokenized them, whatever the mesh's axes); the embeddings and (keep_tokens) the
    tokens and mask are assembled into global row-sharded arrays without a host all-gather. The rows past n are
    zero, as in `PassageIndex.create`. Same embeddings as `encode_corpus` (the same jitted bottom group per row).
    """
    if embed_fn is None:
        from imprag_jax.model import passage_embedding as embed_fn
    if n < 1:
        raise ValueError("empty corpus")
    fp = _resolve_fingerprint(cfg, fingerprint)
    mesh = auto_mesh(mesh)
    n_dev = mesh.size
    n_pad = padded_rows(n, mesh)
    per_dev = n_pad // n_dev
    sh = NamedSharding(mesh, row_spec(mesh))
    starts = sorted({idx[0].start or 0 for idx in sh.addressable_devices_indices_map((n_pad, 1)).values()})
    mine = local_index_rows(n, mesh)
    t0 = time.perf_counter()
    tok, msk = rows_tokens(mine)
    tok, msk = np.asarray(tok, np.int32), np.asarray(msk)
    if tok.shape != (len(mine), l_max) or msk.shape != tok.shape:
        raise ValueError(f"rows_tokens gave {tok.shape} / {msk.shape} for {len(mine)} rows of length {l_max}")
    filler_t = np.zeros((l_max,), np.int32)  # a row for the padding slots of a batch (its embedding is dropped)
    filler_m = np.zeros((l_max,), msk.dtype)
    filler_m[0] = 1
    if len(mine):
        filler_t, filler_m = tok[0], msk[0]

    def block(start: int, lo: int, hi: int):
        """Tokens / mask of index rows [start + lo, start + hi) of the device block starting at `start` (rows past
        n or past the block hold the filler)."""
        t = np.repeat(filler_t[None], hi - lo, axis=0)
        m = np.repeat(filler_m[None], hi - lo, axis=0)
        a, b = start + lo, min(start + hi, start + per_dev, n)
        if b > a:
            pos = np.searchsorted(mine, np.arange(a, b))
            t[: b - a], m[: b - a] = tok[pos], msk[pos]
        return t, m

    params = _on_mesh(params, mesh)
    try:
        from imprag_jax.model.sharding import use_sharding
    except ImportError:  # pragma: no cover
        use_sharding = None
    jitted = _jitted_embed(cfg, embed_fn, sh)
    b = max(1, -(-batch_size // n_dev))  # rows per device and batch
    parts = {s: [] for s in starts}
    for j in range(-(-per_dev // b)):
        cur = {s: block(s, j * b, (j + 1) * b) for s in starts}

        def cb(idx, which):
            return cur[(idx[0].start or 0) // b * per_dev][which]

        tt = jax.make_array_from_callback((n_dev * b, l_max), sh, lambda i: cb(i, 0))
        mm = jax.make_array_from_callback((n_dev * b, l_max), sh, lambda i: cb(i, 1))
        if use_sharding is None:
            e = jitted(params, tt, mm)
        else:
            with use_sharding(mesh):
                e = jitted(params, tt, mm)
        for shard in e.addressable_shards:
            parts[(shard.index[0].start or 0) // b * per_dev].append(np.asarray(shard.data))
    emb, toks, msks = {}, {}, {}
    for s in starts:
        x = np.concatenate(parts[s])[:per_dev].astype(np.float32)
        real = max(0, min(per_dev, n - s))
        x[real:] = 0.0  # padding rows score exactly 0 (the search relies on it)
        emb[s] = x.astype(jnp.dtype(dtype))
        if keep_tokens:
            t, m = block(s, 0, per_dev)
            t[real:], m[real:] = 0, 0
            toks[s], msks[s] = t, m
    D = next(iter(emb.values())).shape[1]

    def put(d, shape, dt):
        return jax.make_array_from_callback(shape, sh, lambda idx: d[idx[0].start or 0].astype(dt, copy=False))

    e_g = put(emb, (n_pad, D), jnp.dtype(dtype))
    t_g = m_g = None
    if keep_tokens:
        t_g, m_g = put(toks, (n_pad, l_max), np.int32), put(msks, (n_pad, l_max), msk.dtype)
    secs = time.perf_counter() - t0
    log.info("encode_corpus_sharded: %d of %d passages on process %d in %.1fs", len(mine), n, jax.process_index(),
             secs)
    if stats is not None:
        stats.update(passages=n, local_passages=len(mine), seconds=secs)
    return PassageIndex(e_g, t_g, m_g, step=int(step), n=int(n), config_hash=fp, mesh=mesh)
