"""Precomputed passage K/V for inference (paper App. C): every corpus passage's middle-group K/V, stored once.

With `passage_attention = "independent"` a passage's keys and values in the middle group (layers b..t) depend on
the passage alone: it attends only to itself, and RoPE makes its attention depend on position differences only,
so its hidden states are the same in every slot. The store holds, per passage, the K/V of its real tokens in
every middle layer and KV head, plus its retrieval key E_p; inference then runs only the prompt (bottom group ->
E_q -> search -> load the top-k passages' K/V -> middle + top -> decoding) and never runs a passage.

What is stored (per token, token-major so that one passage is one contiguous slice):
  * keys WITHOUT the rotary rotation (`apply_rope` by minus the token's position inside its passage, in fp32),
    values as they are. `KVStore.load` places passage j of a row in slot j (columns j*l_max..) and rotates each
    key by its slot position j*l_max + p, which is what `model.transformer.passage_kv` computes for that slot.
    Unrotated keys make the store independent of the slot and of k, and give PQ one distribution per head to
    learn instead of one smeared over positions.
  * `pos`: each stored token's position p inside its passage (its original position; with H2O the kept tokens
    keep theirs, the dropped ones leave gaps).
  * `e_p`: E_p (fp32) of every passage, so the retrieval index can be built from the store without re-encoding.

Options (both decoded on load, so the reader sees a plain `PassageKV`):
  * `h2o=r`: keep ceil(r * n) of each passage's n real tokens, those that received the most attention from the
    passage's own tokens, summed over the middle layers, query heads and queries (H2O's accumulated-attention
    score, computed once at build time from the passage's own causal attention; the prompts that will read the
    passage are not known then). One selection per passage, shared by every middle layer and head, because the
    reader's passage mask (`PassageKV.mask`) is one per passage slot.
  * `pq_m=M`: product quantization with faiss, one `faiss.ProductQuantizer` (8 bits, 256 centroids per
    sub-quantizer) per (middle layer, K/V, KV head), trained on the real tokens of a random sample of passages;
    each head vector of head_dim values becomes M one-byte codes. The centroids go into `pq_centroids.npy`; decoding is the
    centroid lookup (what `ProductQuantizer.decode` does), done on the device when a batch is loaded.

Layout of a store folder:
    manifest.json                 format, fingerprint (model config + a digest of the weights), l_max, b, t,
                                  shapes, dtype, codec, shard size, bytes, build time
    pq_centroids.npy              [n_mid, 2, KV, M, 256, head_dim/M] fp32 (PQ only)
    shards/00000/offsets.npy      [n+1] int64: passage i of the shard is tokens offsets[i]:offsets[i+1]
                 pos.npy          [T] int32
                 k.npy, v.npy     [T, n_mid, KV, head_dim] (dtype)        or  codes.npy [T, n_mid, 2, KV, M] uint8
                 e_p.npy          [n, D] fp32
Shard s holds passages s*shard_size .. (s+1)*shard_size-1 (knowledge-source rows); every array is read through
`np.load(mmap_mode="r")`, so opening a store reads only the manifest and loading k passages touches only theirs.

The build is resumable: each shard is written into `shards/0000s.tmp/` and renamed to `shards/0000s/` once all
its arrays are flushed; `build_state.json` (the fingerprint, a digest of the corpus tokens and the build options)
lists the shards done, and `manifest.json` is written (atomically) only when every shard is, so a folder without
it is never read as a store. The same command run again after an interruption skips the shards done (and reuses
the PQ codec); other weights, corpus or options are refused in one line unless --overwrite.

    python -m imprag_jax.kv_store build --workdir runs/synthetic --out runs/synthetic/kv [--h2o 0.5] [--pq_m 8]
    python -m imprag_jax.kv_store info runs/synthetic/kv
    python -m imprag_jax.evaluate --workdir runs/synthetic --kv_store runs/synthetic/kv

A store built from other weights or another config (the fingerprint differs) is refused with one line; a model
with joint passage attention cannot have a store (a passage's K/V there depends on the passages before it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..model.layers import NEG_INF, DecoderLayer, apply_rope, rope_inv_freq
from ..model.transformer import (PassageKV, _scan_layers, causal_mask, layer_slice, passage_kv,
                                 positions_from_mask, retrieval_embedding, run_bottom)

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")


class KVStoreError(ValueError):
    """A store that cannot serve this model or request; the message is one line that says what to do."""


# ------------------------------------------------------------------------------------------------ fingerprint
def weights_digest(params) -> str:
    """A 16-hex-digit digest of every parameter's path, shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=8)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def store_fingerprint(params, cfg: ModelConfig) -> str:
    """`embedding_fingerprint` of the config with the weights' digest and the middle-group fields mixed in."""
    from ..retrieval.index import embedding_fingerprint

    return embedding_fingerprint(cfg, extra={"weights": weights_digest(params), "t": cfg.t, "dtype": cfg.dtype,
                                             "passage_attention": cfg.passage_attention,
                                             "rope_scaling": cfg.rope_scaling, "embed_scale": cfg.embed_scale,
                                             "rms_norm_eps": cfg.rms_norm_eps})


def check_independent(cfg: ModelConfig) -> None:
    if cfg.passage_attention != "independent":
        raise KVStoreError(f"precomputed passage K/V needs model.passage_attention='independent' (this model has "
                           f"{cfg.passage_attention!r}: a passage's middle-group K/V depends on the passages read "
                           "before it, so it cannot be computed once per passage)")


# ------------------------------------------------------------------------------------------------ computing K/V
def received_attention(params, cfg: ModelConfig, h_b, mask):
    """[n, L] attention each token receives from its passage's own (real) tokens, summed over the middle layers
    b..t and every query head (the H2O score). h_b: [n, L, d] states at the input of layer b; mask: [n, L]."""
    pos = positions_from_mask(mask)
    mask3 = causal_mask(mask)
    inv = rope_inv_freq(cfg)
    layer = DecoderLayer(cfg)
    qmask = mask.astype(jnp.float32)[:, None, None, :, None]

    def body(p, h, _):
        q = apply_rope(layer.apply({"params": p}, h, method=DecoderLayer.retrieval_q), pos, inv)
        k, _ = layer.apply({"params": p}, h, pos, method=DecoderLayer.kv)
        n, L, H, D = q.shape
        KV = k.shape[2]
        logits = jnp.einsum("nqhgd,nkhd->nhgqk", q.reshape(n, L, KV, H // KV, D), k,
                            preferred_element_type=jnp.float32) / math.sqrt(D)
        probs = jax.nn.softmax(jnp.where(mask3[:, None, None], logits, NEG_INF), axis=-1) * qmask
        return layer.apply({"params": p}, h, pos, mask3), probs.sum((1, 2, 3))

    _, recv = _scan_layers(cfg, layer_slice(params, cfg.b, cfg.t + 1), body, h_b)
    return recv.sum(0) * mask


@partial(jax.jit, static_argnames=("cfg", "scores"))
def encode_passages(params, cfg: ModelConfig, tokens, mask, scores: bool = False):
    """[n, L] passages -> (E_p [n, D] fp32, unrotated keys and values [n, L, n_mid, KV, D] (fp32 keys, values in
    the compute dtype), H2O scores [n, L] or None): each passage alone, in slot 0 (`passage_kv` with k = 1)."""
    h = run_bottom(params, cfg, tokens, mask)
    e_p = retrieval_embedding(params, cfg, h, mask, "k")
    pkv = passage_kv(params, cfg, h[:, None], mask[:, None], attention="independent")
    pos = positions_from_mask(mask)
    k0 = apply_rope(pkv.k.astype(jnp.float32), -pos[None], rope_inv_freq(cfg))  # rotation by -p undoes +p
    recv = received_attention(params, cfg, h, mask) if scores else None
    return e_p, k0.transpose(1, 2, 0, 3, 4), pkv.v.transpose(1, 2, 0, 3, 4), recv


@partial(jax.jit, static_argnames=("cfg",))
def _rotate(cfg: ModelConfig, k0, v, pos):
    """[B, P, n_mid, KV, D] unrotated keys / values and slot positions [B, P] -> PassageKV arrays [n_mid, B, P, ...]."""
    # apply_rope wants [..., L, heads, D] with positions [..., L]: the layer axis goes first
    k = apply_rope(k0.astype(jnp.float32).transpose(2, 0, 1, 3, 4), pos[None], rope_inv_freq(cfg))
    dt = jnp.dtype(cfg.dtype)
    return k.astype(dt), v.astype(dt).transpose(2, 0, 1, 3, 4)


@jax.jit
def _pq_decode(centroids, codes):
    """centroids [n_mid, 2, KV, M, ksub, dsub]; codes [B, P, n_mid, 2, KV, M] -> [2, B, P, n_mid, KV, M*dsub]."""
    n_mid, _, KV, M, ksub, dsub = centroids.shape
    li = jnp.arange(n_mid)[:, None, None, None]
    ci = jnp.arange(2)[None, :, None, None]
    hi = jnp.arange(KV)[None, None, :, None]
    mi = jnp.arange(M)[None, None, None, :]
    vec = centroids[li, ci, hi, mi, codes.astype(jnp.int32)]  # [B, P, n_mid, 2, KV, M, dsub]
    vec = vec.reshape(*codes.shape[:-1], M * dsub)
    return jnp.moveaxis(vec, 3, 0)


# ------------------------------------------------------------------------------------------------ build
def _kept_columns(mask_row: np.ndarray, n_keep: int, score_row: Optional[np.ndarray]) -> np.ndarray:
    cols = np.nonzero(mask_row)[0]
    if score_row is None or n_keep >= len(cols):
        return cols
    top = np.argsort(-score_row[cols], kind="stable")[:n_keep]
    return np.sort(cols[top])


def _n_keep(n_real: np.ndarray, h2o: Optional[float]) -> np.ndarray:
    if h2o is None:
        return n_real.astype(np.int64)
    return np.where(n_real > 0, np.maximum(1, np.ceil(h2o * n_real - 1e-9)), 0).astype(np.int64)


PQ_BITS = 8  # one byte per code: faiss packs codes of fewer bits, the store keeps one uint8 per sub-vector


def check_options(cfg, h2o, pq_m, dtype):
    if h2o is not None and not 0.0 < h2o <= 1.0:
        raise KVStoreError(f"h2o keeps a ratio of each passage's tokens: it must be in (0, 1], got {h2o}")
    if pq_m is not None:
        if pq_m < 1 or cfg.head_dim % pq_m:
            raise KVStoreError(f"pq_m={pq_m} must divide head_dim={cfg.head_dim} (sub-vectors of head_dim/pq_m)")
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise KVStoreError("product quantization needs faiss (pip install faiss-cpu)") from None
    if dtype not in DTYPES:
        raise KVStoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


def _run_batch(params, cfg, tokens, mask, s, e, batch_size, scores):
    """encode_passages on rows s:e padded to the fixed batch size (one compilation) -> host arrays."""
    t = np.zeros((batch_size, tokens.shape[1]), np.int32)
    m = np.zeros((batch_size, tokens.shape[1]), np.int32)
    t[:e - s], m[:e - s] = tokens[s:e], mask[s:e]
    out = encode_passages(params, cfg, jnp.asarray(t), jnp.asarray(m), scores=scores)
    return [None if o is None else np.asarray(o)[:e - s] for o in out]


def _train_pq(params, cfg, tokens, mask, pq_m, pq_train, batch_size, seed, log):
    """One faiss ProductQuantizer per (middle layer, K/V, KV head) on the real tokens of random passages."""
    import faiss

    rng = np.random.default_rng(seed)
    n_real = mask.sum(1)
    order = rng.permutation(len(tokens))
    take = order[:max(1, int(np.searchsorted(np.cumsum(n_real[order]), pq_train)) + 1)]
    take = np.sort(take)
    vecs = []
    for s, e in _batches(len(take), batch_size):
        rows = take[s:e]
        _, k0, v, _ = _run_batch(params, cfg, tokens[rows], mask[rows], 0, len(rows), batch_size, False)
        m = mask[rows].astype(bool)
        vecs.append(np.stack([k0[m], v[m].astype(np.float32)], 2))  # [T, n_mid, 2, KV, D]
    x = np.concatenate(vecs)[:pq_train]
    ksub = 2 ** PQ_BITS
    if len(x) < ksub:
        raise KVStoreError(f"PQ needs at least {ksub} training vectors per codec (256 centroids), the corpus has "
                           f"{len(x)} tokens")
    n_mid, _, KV, D = x.shape[1:]
    cent = np.zeros((n_mid, 2, KV, pq_m, ksub, D // pq_m), np.float32)
    pqs = {}
    log(f"[kv_store] training {n_mid * 2 * KV} PQ codecs (M={pq_m}, {PQ_BITS} bits) on {len(x)} token vectors")
    for li in range(n_mid):
        for c in range(2):
            for h in range(KV):
                pq = faiss.ProductQuantizer(D, pq_m, PQ_BITS)
                pq.verbose = False
                pq.train(np.ascontiguousarray(x[:, li, c, h], np.float32))
                cent[li, c, h] = faiss.vector_to_array(pq.centroids).reshape(pq_m, ksub, D // pq_m)
                pqs[li, c, h] = pq
    return cent, pqs


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


BUILD_STATE = "build_state.json"  # an unfinished build: its options and the shards already written


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(path: str, arr) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def corpus_digest(tokens, mask) -> str:
    h = hashlib.blake2b(digest_size=8)
    for a in (np.ascontiguousarray(tokens, np.int32), np.ascontiguousarray(mask, np.int32)):
        h.update(f"{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def clear_store(out_dir: str) -> None:
    """Remove what a build writes in `out_dir` (manifest, build state, codec, shards), nothing else."""
    import shutil

    for f in (MANIFEST, BUILD_STATE, "pq_centroids.npy"):
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    if os.path.isdir(os.path.join(out_dir, "shards")):
        shutil.rmtree(os.path.join(out_dir, "shards"))


def _commit_shard(tmp_dir: str, final_dir: str) -> None:
    """A shard becomes visible under its final name only once every file in it is written (one rename)."""
    os.replace(tmp_dir, final_dir)


def _pq_from_centroids(cent):
    """The ProductQuantizers of stored centroids [n_mid, 2, KV, M, ksub, dsub] (a resumed build codes with them)."""
    import faiss

    n_mid, _, KV, M, ksub, dsub = cent.shape
    pqs = {}
    for li in range(n_mid):
        for c in range(2):
            for h in range(KV):
                pq = faiss.ProductQuantizer(M * dsub, M, PQ_BITS)
                faiss.copy_array_to_vector(np.ascontiguousarray(cent[li, c, h], np.float32).ravel(), pq.centroids)
                pqs[li, c, h] = pq
    return pqs


def build_store(params, cfg: ModelConfig, tokens, mask, out_dir: str, *, h2o: Optional[float] = None,
                pq_m: Optional[int] = None, pq_train: int = 20000, dtype: Optional[str] = None,
                shard_size: int = 4096, batch_size: int = 64, seed: int = 0, progress: bool = True,
                h2o_score: str = "sum", faiss_threads: int = 1, overwrite: bool = False, extra=None,
                log=_log) -> dict:
    """Write the store of the passages `tokens`/`mask` [N, l_max] (knowledge-source rows) to `out_dir`; returns
    the manifest. dtype: of the stored K/V without PQ (default: float32; float16 halves the bytes). pq_train: token
    vectors each PQ codec is trained on. h2o_score: "sum" (H2O's accumulated attention) or "mean" (divided by the
    number of the passage's queries that see the token, which removes the causal advantage of early tokens); (the build time of a PQ store is mostly this training: faiss k-means,
    256 centroids per sub-quantizer, one codec per middle layer, K/V and KV head). extra: fields added to the
    manifest.

    Resumable: shard by shard, each written in a temporary folder and renamed when complete, and recorded in
    `build_state.json` (the fingerprint, the corpus digest and the options). Run again after an interruption it
    skips the shards already written (and reuses the PQ codec); with other weights, corpus or options it raises
    KVStoreError unless `overwrite` (which starts over). `manifest.json`, which `KVStore` needs, is written last."""
    from tqdm import tqdm

    check_independent(cfg)
    dtype = dtype or "float32"
    check_options(cfg, h2o, pq_m, dtype)
    if h2o_score not in ("sum", "mean"):
        raise KVStoreError(f"h2o_score must be 'sum' or 'mean', got {h2o_score!r}")
    tokens, mask = np.asarray(tokens, np.int32), (np.asarray(mask) > 0).astype(np.int32)
    N, L = tokens.shape
    n_mid, KV, D = cfg.t - cfg.b + 1, cfg.num_kv_heads, cfg.head_dim
    fp = store_fingerprint(params, cfg)
    params = jax.tree.map(jnp.asarray, params)
    n_shards = max(1, -(-N // shard_size))
    want = {"format": FORMAT, "fingerprint": fp, "corpus": corpus_digest(tokens, mask), "n": int(N), "l_max": int(L),
            "options": {"h2o": h2o, "h2o_score": h2o_score if h2o is not None else None, "pq_m": pq_m,
                        "pq_train": int(pq_train) if pq_m else None, "dtype": dtype, "shard_size": int(shard_size),
                        "seed": int(seed)}}
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, BUILD_STATE)
    state = None
    if overwrite:
        clear_store(out_dir)
    elif os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise KVStoreError(f"{out_dir} already holds a store; pass --overwrite to replace it or choose another --out")
    elif os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        old = {k: state.get(k) for k in want}
        if old != want:
            prev = old["options"] or {}
            diff = ", ".join(
                [{"fingerprint": "weights or model config", "corpus": "corpus tokens"}.get(k, k)
                 for k in want if k != "options" and old[k] != want[k]]
                + [f"{o} {prev.get(o)} -> {v}" for o, v in want["options"].items() if prev.get(o) != v])
            raise KVStoreError(f"{out_dir} holds an unfinished build with other weights, corpus or options ({diff}); "
                               "rerun it with the same ones to resume, or pass --overwrite to start over")
    elif os.path.isdir(os.path.join(out_dir, "shards")):
        raise KVStoreError(f"{out_dir} holds shards but no {BUILD_STATE}; pass --overwrite to start over")
    if state is None:
        state = dict(want, done=[], build_seconds=0.0, pq_train_seconds=0.0)
        _atomic_json(state_path, state)
    done = set(int(s) for s in state["done"])
    if done:
        log(f"[kv_store] resuming: {len(done)} of {n_shards} shards already written")
    cent = pqs = None
    omp = None
    t_pq = 0.0
    if pq_m is not None:
        import faiss

        # one OpenMP thread: the codecs are small, and faiss's threads spin-wait; on a busy 2-core machine two of
        # them made each codec's training 75x slower (3.9 s vs 0.05 s for 512 vectors)
        omp = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(faiss_threads)
        cpath = os.path.join(out_dir, "pq_centroids.npy")
        if state.get("pq_trained") and os.path.exists(cpath):
            cent = np.load(cpath)
            pqs = _pq_from_centroids(cent)
        else:
            t0 = time.time()
            cent, pqs = _train_pq(params, cfg, tokens, mask, pq_m, pq_train, batch_size, seed, log)
            _atomic_save(cpath, cent)
            t_pq = time.time() - t0
            state["pq_trained"] = True
            state["pq_train_seconds"] = round(t_pq, 2)
            _atomic_json(state_path, state)
    keep = _n_keep(mask.sum(1), h2o)
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    bar = tqdm(total=N, desc="kv_store", unit="passage", dynamic_ncols=True, mininterval=1.0, disable=not progress)
    bar.update(sum(min(N, (s + 1) * shard_size) - s * shard_size for s in done))
    t_run = time.time()
    for sh in range(n_shards):
        lo, hi = sh * shard_size, min(N, (sh + 1) * shard_size)
        final = os.path.join(out_dir, "shards", f"{sh:05d}")
        if sh in done and os.path.isdir(final):
            continue
        if os.path.isdir(final):  # renamed but not recorded: written completely, recorded now
            done.add(sh)
        else:
            _write_shard(params, cfg, tokens, mask, keep, lo, hi, final, h2o, h2o_score, pq_m, pqs, dtype,
                         batch_size, bar)
            done.add(sh)
        state["done"] = sorted(done)
        _atomic_json(state_path, state)
    bar.close()
    if omp is not None:
        faiss.omp_set_num_threads(omp)
    state["build_seconds"] = round(float(state.get("build_seconds", 0.0)) + time.time() - t_run + t_pq, 2)
    sizes = [(f, os.path.getsize(os.path.join(dp, f))) for dp, _, fs in os.walk(out_dir) for f in fs
             if f not in (BUILD_STATE, MANIFEST)]
    disk = sum(b for _, b in sizes)
    e_p_bytes = sum(b for f, b in sizes if f == "e_p.npy")
    codec = sum(b for f, b in sizes if f == "pq_centroids.npy")
    kv_bytes = disk - e_p_bytes - codec  # K/V (or codes), positions, offsets (and the .npy headers)
    manifest = {
        "format": FORMAT, "fingerprint": fp, "n": int(N), "l_max": int(L), "b": cfg.b, "t": cfg.t,
        "n_middle": n_mid, "num_kv_heads": KV, "head_dim": D, "retrieval_dim": cfg.retrieval_dim,
        "model_dtype": cfg.dtype, "passage_attention": cfg.passage_attention, "shard_size": int(shard_size),
        "n_shards": n_shards, "key_rotation": "unrotated (rotated on load by slot position j*l_max + p)",
        "codec": {"kind": "pq" if pq_m else "raw", "dtype": dtype if pq_m is None else "uint8",
                  "pq_m": pq_m, "pq_bits": PQ_BITS if pq_m else None,
                  "pq_train_vectors": int(pq_train) if pq_m else None},
        "h2o": h2o, "h2o_score": (f"{h2o_score} of the attention received from the passage's own tokens, middle layers "
                      "and heads summed") if h2o is not None else None,
        "tokens": int(keep.sum()), "real_tokens": int(mask.sum()),
        "slot_width": int(L if h2o is None else max(1, int(keep.max(initial=0)))),
        "disk_bytes": int(disk), "disk_bytes_per_passage": disk / max(N, 1),
        "kv_bytes_per_passage": kv_bytes / max(N, 1), "e_p_bytes_per_passage": e_p_bytes / max(N, 1),
        "codec_bytes": int(codec), "corpus": want["corpus"], "seed": int(seed),
        "build_seconds": state["build_seconds"], "pq_train_seconds": float(state.get("pq_train_seconds", 0.0)),
    }
    manifest.update(extra or {})
    _atomic_json(os.path.join(out_dir, MANIFEST), manifest)
    os.remove(state_path)
    log(f"[kv_store] {N} passages, {manifest['tokens']} tokens kept of {manifest['real_tokens']}; "
        f"{disk / 2**20:.1f} MiB ({disk / max(N, 1) / 1024:.1f} KiB per passage) in {manifest['build_seconds']:.1f}s")
    return manifest


def _write_shard(params, cfg, tokens, mask, keep, lo, hi, final, h2o, h2o_score, pq_m, pqs, dtype, batch_size, bar):
    """Passages lo..hi-1 into a temporary folder next to `final`, renamed to `final` when every array is flushed."""
    import shutil

    n_mid, KV, D = cfg.t - cfg.b + 1, cfg.num_kv_heads, cfg.head_dim
    tmp = f"{final}.tmp"
    if os.path.isdir(tmp):  # left by an interrupted build
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    off = np.zeros(hi - lo + 1, np.int64)
    off[1:] = np.cumsum(keep[lo:hi])
    np.save(os.path.join(tmp, "offsets.npy"), off)
    T = int(off[-1])
    om = partial(np.lib.format.open_memmap, mode="w+")
    arrs = {"pos": om(os.path.join(tmp, "pos.npy"), dtype=np.int32, shape=(T,)),
            "e_p": om(os.path.join(tmp, "e_p.npy"), dtype=np.float32, shape=(hi - lo, cfg.retrieval_dim))}
    if pq_m is None:
        for name in ("k", "v"):
            arrs[name] = om(os.path.join(tmp, f"{name}.npy"), dtype=np.dtype(dtype), shape=(T, n_mid, KV, D))
    else:
        arrs["codes"] = om(os.path.join(tmp, "codes.npy"), dtype=np.uint8, shape=(T, n_mid, 2, KV, pq_m))
    for s, e in _batches(hi - lo, batch_size):
        s, e = s + lo, e + lo
        e_p, k0, v, recv = _run_batch(params, cfg, tokens, mask, s, e, batch_size, h2o is not None)
        if recv is not None and h2o_score == "mean":  # per query that can see the token (causal: n - p of them)
            seen = mask[s:e].sum(1, keepdims=True) - (np.cumsum(mask[s:e], 1) - 1)
            recv = recv / np.maximum(seen, 1)
        kept = [_kept_columns(mask[i], int(keep[i]), None if recv is None else recv[i - s]) for i in range(s, e)]
        if pq_m is not None:  # the batch's kept tokens coded together: one faiss call per codec and batch
            sel = np.concatenate([np.stack([k0[r, c], v[r, c].astype(np.float32)], 2) for r, c in enumerate(kept)])
            codes = np.zeros((len(sel), n_mid, 2, KV, pq_m), np.uint8)
            for li in range(n_mid):
                for c in range(2):
                    for h in range(KV):
                        if len(sel):
                            codes[:, li, c, h] = pqs[li, c, h].compute_codes(np.ascontiguousarray(sel[:, li, c, h]))
            starts = np.concatenate([[0], np.cumsum([len(c) for c in kept])])
        for i in range(s, e):
            r = i - s
            cols = kept[r]
            a, b_ = int(off[i - lo]), int(off[i - lo + 1])
            arrs["e_p"][i - lo] = e_p[r]
            pos = np.cumsum(mask[i]) - 1
            arrs["pos"][a:b_] = pos[cols]
            if pq_m is None:
                arrs["k"][a:b_] = k0[r, cols]
                arrs["v"][a:b_] = v[r, cols]
            else:
                arrs["codes"][a:b_] = codes[starts[r]:starts[r + 1]]
        bar.update(e - s)
    for a in arrs.values():
        a.flush()
    del arrs
    _commit_shard(tmp, final)


# ------------------------------------------------------------------------------------------------ load
class KVStore:
    """A store folder opened for reading (memory-mapped); `load(ids, cfg)` -> `PassageKV` for the reader."""

    def __init__(self, path: str):
        mp = os.path.join(path, MANIFEST)
        if not os.path.isfile(mp):
            raise KVStoreError(f"no passage K/V store at {path} (no {MANIFEST}; build one with "
                               "python -m imprag_jax.kv_store build)")
        with open(mp) as f:
            self.manifest = m = json.load(f)
        if m.get("format") != FORMAT:
            raise KVStoreError(f"{mp}: store format {m.get('format')} is not {FORMAT}; rebuild the store")
        self.path = path
        self.n, self.l_max, self.shard_size = int(m["n"]), int(m["l_max"]), int(m["shard_size"])
        self.pq = m["codec"]["kind"] == "pq"
        self._shards = {}
        self._centroids = None
        if self.pq:
            self._centroids = jnp.asarray(np.load(os.path.join(path, "pq_centroids.npy")))

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def check(self, params, cfg: ModelConfig) -> None:
        """Refuse (KVStoreError, one line) a joint model, or a store built from other weights / another config."""
        check_independent(cfg)
        fp = store_fingerprint(params, cfg)
        if fp != self.fingerprint:
            raise KVStoreError(f"the passage K/V store {self.path} was built from other weights or another model "
                               f"config (fingerprint {self.fingerprint}, this model {fp}); rebuild it with "
                               "python -m imprag_jax.kv_store build")

    def _shard(self, s: int) -> dict:
        if s not in self._shards:
            d = os.path.join(self.path, "shards", f"{s:05d}")
            names = ("offsets", "pos", "e_p") + (("codes",) if self.pq else ("k", "v"))
            self._shards[s] = {n: np.load(os.path.join(d, f"{n}.npy"), mmap_mode="r") for n in names}
        return self._shards[s]

    def embeddings(self) -> np.ndarray:
        """E_p of every passage [N, D] fp32."""
        return np.concatenate([np.asarray(self._shard(s)["e_p"]) for s in range(self.manifest["n_shards"])])

    @property
    def slot_width(self) -> int:
        """Columns per passage in a loaded `PassageKV`: l_max, or with H2O the most tokens a passage kept."""
        return int(self.manifest.get("slot_width", self.l_max))

    def load(self, ids, cfg: ModelConfig) -> PassageKV:
        """Passage ids [B, k] (knowledge-source rows; -1: an empty slot) -> the `PassageKV` that
        `passage_kv` gives for those passages in slots 0..k-1 (slot j at positions j*l_max + p), laid out as
        [.., k * slot_width, ..]: without H2O exactly `passage_kv`'s layout; with H2O each passage's kept tokens
        in columns j*slot_width.. (positions are carried by the rotation, so the narrower slots change nothing
        but the attention width)."""
        ids = np.asarray(ids)
        B, k = ids.shape
        L, m = self.l_max, self.manifest
        W = self.slot_width
        P = k * W
        n_mid, KV, D = m["n_middle"], m["num_kv_heads"], m["head_dim"]
        if (n_mid, KV, D) != (cfg.t - cfg.b + 1, cfg.num_kv_heads, cfg.head_dim):
            raise KVStoreError(f"the store holds {n_mid} middle layers x {KV} KV heads x {D}, the model needs "
                               f"{cfg.t - cfg.b + 1} x {cfg.num_kv_heads} x {cfg.head_dim}")
        if np.any(ids >= self.n):
            raise KVStoreError(f"passage id {int(ids.max())} is outside the store ({self.n} passages)")
        pos = np.zeros((B, P), np.int32)
        mask = np.zeros((B, P), bool)
        if self.pq:
            buf = np.zeros((B, P, n_mid, 2, KV, m["codec"]["pq_m"]), np.uint8)
        else:
            dt = np.dtype(m["codec"]["dtype"])
            kb, vb = np.zeros((B, P, n_mid, KV, D), dt), np.zeros((B, P, n_mid, KV, D), dt)
        for r in range(B):
            for j in range(k):
                i = int(ids[r, j])
                if i < 0:
                    continue
                sh = self._shard(i // self.shard_size)
                li = i % self.shard_size
                a, b_ = int(sh["offsets"][li]), int(sh["offsets"][li + 1])
                sl = slice(j * W, j * W + b_ - a)
                pos[r, sl] = j * L + sh["pos"][a:b_]
                mask[r, sl] = True
                if self.pq:
                    buf[r, sl] = sh["codes"][a:b_]
                else:
                    kb[r, sl], vb[r, sl] = sh["k"][a:b_], sh["v"][a:b_]
        if self.pq:
            kb, vb = _pq_decode(self._centroids, jnp.asarray(buf))
        k_rot, v = _rotate(cfg, jnp.asarray(kb), jnp.asarray(vb), jnp.asarray(pos))
        return PassageKV(k_rot, v, jnp.asarray(mask))


def open_store(path: str, params=None, cfg: Optional[ModelConfig] = None) -> KVStore:
    """Open a store; with params and cfg, refuse it unless it was built from exactly these weights."""
    store = KVStore(path)
    if params is not None and cfg is not None:
        store.check(params, cfg)
    return store
