"""Train-step benchmark: step time, tokens/s and MFU of the plain-LM step and the ImpRAG warmup / self-distillation
steps on the same tokens, with the model FLOPs counted analytically per component (and checked against XLA).

    python benchmarks/train_step.py --json OUT.json                       # SmolLM2 shapes, k = 10, fp32 CPU
    python benchmarks/train_step.py --json OUT.json --quick               # CI: tiny shape, 2 timed steps
    python benchmarks/train_step.py --json OUT.json --shape llama3_3b --suite gpu --budget-s 420   # GPU levers
    python benchmarks/train_step.py --json OUT.json --suite gpu --dry-run # the GPU suite's plumbing, tiny, on CPU

Steps measured (random weights, one shared train state chained through every step, all timed in ONE run,
interleaved A, B, C, A, B, C, ...; the median over the rounds is reported):

  plain_lm       the plain decoder over one sequence [k passages ; prompt ; response] (T = k*l + L tokens), the
                 next-token loss on every position (the standard LM step), same AdamW as training
  plain_lm_resp  the same sequence, the loss on the r response tokens only (what ImpRAG's J_gen scores: the
                 concatenation-RAG baseline; stricter, since it skips the T-position vocabulary projection)
  warmup         `imprag_jax.train.state.compile_step(..., "warmup")`: reader + multi-label NCE
  distill        `compile_step(..., "distill")`: reader + per-candidate teacher passes + KL

Model FLOPs (what the algorithm needs; a matmul of [m, n] x [n, p] is 2mnp; embeddings gathers and elementwise
ops are not counted; backward = 2 x forward, so trained parts count 3 x forward, the teacher (stop_gradient)
1 x forward).  With d = hidden, f = FFN, H / KV query / key-value heads of size Dh, V = vocab, N layers split
into b bottom, n_mid = t - b + 1 middle and n_top = N - t - 1 top layers:

  lin   = 2 (2 d H Dh + 2 d KV Dh + 3 d f)      forward FLOPs of one token through one layer's projections + MLP
  att   = 4 H Dh                                forward FLOPs of one (query, key) pair (QK^T and PV)
  C(n)  = n (n + 1) / 2                         causal pairs of an n-token sequence
  head  = 2 d V                                 one token's vocabulary projection

  per example, L = prompt + response tokens, k passages of l tokens, P = k l, r scored response tokens:
  reader (x3)   prompt:    L N lin + N C(L) att + n_mid L P att           (all layers; reads the passage K/V)
                passages:  P b lin + k b C(l) att                         (bottom: each passage alone)
                         + P n_mid lin + n_mid C(P) att                   (middle: joint; independent: k C(l))
                head:      r head
  retrieval (x3) E_q 2 d H Dh,  E_p k 2 d KV Dh,  scores k 2 D (+ warmup NCE over the batch: B k 2 D), D = KV Dh
  teacher (x1, distill only)
                passages:  P n_mid lin + k n_mid C(l) att                 (middle, each passage alone)
                prompts:   k [L (n_mid + n_top) lin + (n_mid + n_top) C(L) att + n_mid L l att + r head]
  plain (x3)    T N lin + N C(T) att + (T - 1) head   (plain_lm_resp: r head),  T = P + L

MFU = model FLOPs / step time / peak.  On the CPU the peak is a big fp32 matmul measured in the same run
("MFU vs measured matmul peak"); on a GPU the bf16 dense spec peak (and the measured bf16 matmul beside it).
"impl" FLOPs count what the code executes instead: dense masked attention squares (L^2, P^2, L(P+L)), the
teacher's independent middle pass over the whole [P, P] square, and the recomputed forward under remat.  XLA's
`cost_analysis()` counts a `while` (scan) body once, so the check against it compiles the same steps with two
layers per group (N = 6, b = 2, t = 3; the plain step with N = 2) and compares with the impl count of one loop
body per group (N = 3, b = t = 1; plain N = 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from typing import Dict, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCHEMA = "imprag_jax.bench.train_step/1"
STEPS = ("plain_lm", "plain_lm_resp", "warmup", "distill")
# bf16 dense tensor-core peaks (FLOP/s) by device kind; MFU on a GPU is reported against these
GPU_PEAKS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12),
             ("L40S", 362.0e12), ("B200", 2250.0e12))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ================================================================================================ shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    """Model preset and batch geometry: B examples, prompt L_q + response L_r tokens, k passages of l tokens."""

    name: str
    B: int
    k: int
    L_q: int
    L_r: int
    l: int
    plain_T: Optional[int] = None  # plain step sequence length (default: the same tokens, k*l + L_q + L_r)
    Bf: int = 0  # retrieval-free rows per step (the ImpRAG steps only): Lf tokens each, the last Lfr scored
    Lf: int = 0
    Lfr: int = 0

    @property
    def L(self) -> int:
        return self.L_q + self.L_r

    @property
    def T(self) -> int:
        return self.plain_T or (self.k * self.l + self.L)

    def tokens(self, step: str) -> int:
        """Tokens one step processes (the ImpRAG steps and the same-token plain step: B (k l + L))."""
        if step.startswith("plain"):
            return self.B * self.T
        return self.B * (self.k * self.l + self.L) + self.Bf * self.Lf


def model_config(name: str, dtype: Optional[str] = None, **kw):
    from imprag_jax.model import ModelConfig

    if name == "tiny":
        cfg = ModelConfig.tiny(num_layers=4, b=1, t=2)
    elif name == "smollm2":
        cfg = ModelConfig.smollm2_135m()
    elif name == "llama3_1b":  # Llama-3.2-1B; ImpRAG split of ours: b = 4, t = 11 (4 top layers)
        cfg = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True, max_position=131072,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192),
                          b=4, t=11, dtype="bfloat16")
    elif name == "llama3_3b":
        cfg = ModelConfig.llama3_2_3b()
    elif name == "llama3_8b":
        cfg = ModelConfig.llama3_1_8b()
    else:
        raise ValueError(f"unknown shape {name!r}")
    if dtype is not None:
        kw["dtype"] = dtype
    return cfg.replace(**kw) if kw else cfg


DEFAULT_GEOMETRY = {  # name -> (B, k, L_q, L_r, l); the SmolLM2 / Llama numbers are the training configs'
    "tiny": (2, 3, 12, 4, 8),
    "smollm2": (1, 10, 64, 16, 128),      # configs/smollm2.py (batch cut to 1 for the 2-core CPU)
    "llama3_1b": (4, 10, 256, 32, 128),
    "llama3_3b": (4, 10, 256, 32, 128),   # configs/llama3.py
    "llama3_8b": (2, 10, 256, 32, 128),
}


# ================================================================================================ FLOPs
def _dims(cfg):
    d, f, H, KV, Dh, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.vocab_size)
    return dict(d=d, f=f, H=H, KV=KV, Dh=Dh, V=V, lin=2 * (2 * d * H * Dh + 2 * d * KV * Dh + 3 * d * f),
                kv=2 * 2 * d * KV * Dh, att=4 * H * Dh, head=2 * d * V, D=KV * Dh)


def layer_counts(cfg) -> Dict[str, int]:
    """Layers per group: bottom b, middle t-b+1 (the passages run t-b of them in full, then only layer t's K/V
    projections: the passage stream ends there), top N-t-1."""
    return dict(bottom=cfg.b, mid=cfg.t - cfg.b + 1, mid_full=cfg.t - cfg.b, top=cfg.num_layers - cfg.t - 1,
                plain=cfg.num_layers)


def _causal(n):
    return n * (n + 1) / 2


def flops_breakdown(cfg, shape: Shape, step: str, impl: bool = False, ce_chunk: int = 0,
                    counts: Optional[Dict[str, int]] = None) -> Dict[str, float]:
    """FLOPs of one step per component (trained parts already x3, teacher x1).

    impl=False: model FLOPs (causal attention pairs, no recomputation).  impl=True: what the code executes
    (dense masked attention squares, the teacher's independent middle pass over the whole P x P square,
    the forward recomputed under remat, the chunked cross-entropy's recomputed logits).
    counts: layers per group (default `layer_counts(cfg)`; the XLA check passes one per loop body).
    """
    z = _dims(cfg)
    n = counts or layer_counts(cfg)
    B, k, L, l, r = shape.B, shape.k, shape.L, shape.l, shape.L_r
    P = k * l
    lin, att, head = z["lin"], z["att"], z["head"]
    nb, nm, nf, nt = n["bottom"], n["mid"], n["mid_full"], n["top"]
    C = (lambda x: float(x) * x) if impl else _causal
    remat = 4.0 if (impl and cfg.remat == "full") else 3.0  # layer scans: fwd (+ recompute) + 2 x bwd
    out: Dict[str, float] = {}
    if step.startswith("plain"):
        T, N = shape.T, n["plain"]
        out["plain_layers"] = remat * B * T * N * lin
        out["plain_attention"] = remat * B * N * C(T) * att
        n_head = T - 1 if step == "plain_lm" else r  # every position but the last predicts a token
        out["lm_head"] = (4.0 if (impl and ce_chunk) else 3.0) * B * n_head * head
        return out
    joint = cfg.passage_attention == "joint"
    out["reader_prompt_layers"] = remat * B * L * (nb + nm + nt) * lin
    out["reader_prompt_self_attention"] = remat * B * (nb + nm + nt) * C(L) * att
    out["reader_prompt_passage_attention"] = remat * B * nm * L * P * att
    out["reader_passage_bottom_layers"] = remat * B * P * nb * lin
    out["reader_passage_bottom_attention"] = remat * B * k * nb * C(l) * att
    out["reader_passage_middle_layers"] = remat * B * P * nf * lin + 3.0 * B * P * z["kv"]
    out["reader_passage_middle_attention"] = remat * B * nf * (C(P) if (joint or impl) else k * C(l)) * att
    out["reader_lm_head"] = 3.0 * B * r * head
    out["retrieval_e_q"] = 3.0 * B * 2 * z["d"] * z["H"] * z["Dh"]
    out["retrieval_e_p"] = 3.0 * B * k * 2 * z["d"] * z["D"]
    out["retrieval_scores"] = 3.0 * B * k * 2 * z["D"] + (3.0 * B * B * k * 2 * z["D"] if step == "warmup" else 0.0)
    if step == "distill":
        out["teacher_passage_middle_layers"] = B * P * (nf * lin + z["kv"])
        out["teacher_passage_middle_attention"] = B * nf * (C(P) if impl else k * C(l)) * att
        out["teacher_prompt_layers"] = B * k * L * (nm + nt) * lin
        out["teacher_prompt_attention"] = B * k * ((nm + nt) * C(L) + nm * L * l) * att
        out["teacher_lm_head"] = B * k * r * head
    if shape.Bf:  # retrieval-free rows: the plain decoder over Lf tokens, Lfr of them scored
        Bf, Lf = shape.Bf, shape.Lf
        out["free_rows_layers"] = remat * Bf * Lf * (nb + nm + nt) * lin
        out["free_rows_attention"] = remat * Bf * (nb + nm + nt) * C(Lf) * att
        out["free_rows_lm_head"] = 3.0 * Bf * shape.Lfr * head
    return out


def flops_total(cfg, shape, step, impl=False, ce_chunk=0, counts=None) -> float:
    return float(sum(flops_breakdown(cfg, shape, step, impl, ce_chunk, counts).values()))


def group_totals(br: Dict[str, float]) -> Dict[str, float]:
    """Components summed by role: reader / retrieval / teacher / plain."""
    out: Dict[str, float] = {}
    for key, v in br.items():
        g = key.split("_")[0]
        g = {"lm": "plain"}.get(g, g)
        out[g] = out.get(g, 0.0) + v
    return out


# ================================================================================================ batches
def random_batch(shape: Shape, vocab: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """A full (no padding) ImpRAG batch: prompt then response, k real passages, the first half positives."""
    rng = np.random.default_rng(seed)
    B, k, L, l = shape.B, shape.k, shape.L, shape.l
    tokens = rng.integers(1, vocab, (B, L), dtype=np.int32)
    mask = np.ones((B, L), np.int32)
    prompt_mask = np.zeros((B, L), np.int32)
    prompt_mask[:, :shape.L_q] = 1
    loss_mask = 1 - prompt_mask
    passages = rng.integers(1, vocab, (B, k, l), dtype=np.int32)
    pmask = np.ones((B, k, l), np.int32)
    ids = np.arange(B * k, dtype=np.int32).reshape(B, k)
    positives = np.zeros((B, k), np.int32)
    positives[:, :max(1, k // 2)] = 1
    out = {"tokens": tokens, "mask": mask, "prompt_mask": prompt_mask, "loss_mask": loss_mask,
           "passages": passages, "passage_mask": pmask, "passage_ids": ids, "positives": positives}
    if shape.Bf:
        out["free_tokens"] = rng.integers(1, vocab, (shape.Bf, shape.Lf), dtype=np.int32)
        out["free_mask"] = np.ones((shape.Bf, shape.Lf), np.int32)
        out["free_loss_mask"] = np.zeros((shape.Bf, shape.Lf), np.int32)
        out["free_loss_mask"][:, shape.Lf - shape.Lfr:] = 1
    return out


def plain_batch(shape: Shape, vocab: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """The plain step's sequence: [passages ; prompt ; response] as one row (or T random tokens), loss mask on
    the response (plain_lm scores every position anyway)."""
    B, T = shape.B, shape.T
    if shape.plain_T is None:
        b = random_batch(shape, vocab, seed)
        tokens = np.concatenate([b["passages"].reshape(B, -1), b["tokens"]], axis=1)
        loss_mask = np.concatenate([np.zeros((B, shape.k * shape.l), np.int32), b["loss_mask"]], axis=1)
    else:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(1, vocab, (B, T), dtype=np.int32)
        loss_mask = np.zeros((B, T), np.int32)
        loss_mask[:, T - shape.L_r:] = 1
    return {"tokens": tokens, "mask": np.ones((B, T), np.int32), "loss_mask": loss_mask}


# ================================================================================================ the plain step
def make_plain_step(cfg, tx, loss: str, r_len: int, ce_chunk: int = 0):
    """train_step-shaped function of the plain decoder: (state, batch) -> (state, metrics).

    loss "lm": next-token NLL of every position (ce_chunk > 0: the vocabulary projection and log-softmax in
    rematerialised chunks of ce_chunk positions, so the [B, T, V] logits never exist at once);
    "resp": the r_len response tokens only (as ImpRAG's J_gen)."""
    import jax
    import jax.numpy as jnp
    import optax

    from imprag_jax.model.transformer import forward, logits_from_hidden
    from imprag_jax.train import losses

    def loss_fn(params, batch):
        tokens, mask = batch["tokens"], batch["mask"]
        h = forward(params, cfg, tokens, mask, return_hidden=True)
        if loss == "resp":
            src, tgt, valid = losses.response_positions(batch["loss_mask"], r_len)
            hs = jnp.take_along_axis(h, src[..., None], axis=1)
            lp = losses.token_logprobs(logits_from_hidden(params, cfg, hs), jnp.take_along_axis(tokens, tgt, 1))
            s, n = losses.generation_nll(lp, valid)
            return s / jnp.maximum(n, 1.0)
        hs, tgt = h[:, :-1], tokens[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        if not ce_chunk:
            lp = losses.token_logprobs(logits_from_hidden(params, cfg, hs), tgt)
            return -(lp * valid).sum() / jnp.maximum(valid.sum(), 1.0)
        Bn, Tm1, d = hs.shape
        n = -(-Tm1 // ce_chunk)
        pad = n * ce_chunk - Tm1
        hs = jnp.pad(hs, ((0, 0), (0, pad), (0, 0)))
        tgt = jnp.pad(tgt, ((0, 0), (0, pad)))
        vv = jnp.pad(valid, ((0, 0), (0, pad)))
        split = lambda x: jnp.swapaxes(x.reshape(Bn, n, ce_chunk, *x.shape[2:]), 0, 1)

        @jax.checkpoint
        def chunk(acc, xs):
            hc, tc, vc = xs
            lp = losses.token_logprobs(logits_from_hidden(params, cfg, hc), tc)
            return acc - (lp * vc).sum(), None

        tot, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), (split(hs), split(tgt), split(vv)))
        return tot / jnp.maximum(valid.sum(), 1.0)

    def step(state, batch):
        params = state["params"]
        nll, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": nll, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_params)}
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def compile_plain(cfg, tx, mesh, shape: Shape, loss: str, ce_chunk: int = 0, donate: bool = True):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from imprag_jax.model.sharding import batch_sharding, use_sharding
    from imprag_jax.train.state import state_shardings

    s_shard, s_abs = state_shardings(cfg, tx, mesh)
    fn = make_plain_step(cfg, tx, loss, shape.L_r, ce_chunk)
    b_abs = {k: jax.ShapeDtypeStruct((shape.B, shape.T), np.int32,
                                     sharding=batch_sharding(mesh, 2, shape=(shape.B, shape.T)))
             for k in ("tokens", "mask", "loss_mask")}

    def wrapped(state, batch):
        with use_sharding(mesh):
            return fn(state, batch)

    jitted = jax.jit(wrapped, in_shardings=(s_shard, {k: v.sharding for k, v in b_abs.items()}),
                     out_shardings=(s_shard, NamedSharding(mesh, P())), donate_argnums=(0,) if donate else ())
    s_abs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s_abs, s_shard)
    return jitted.lower(s_abs, b_abs).compile()


# ================================================================================================ levers
_REGISTERED: Dict[str, str] = {}


def causal_attention(dense_len: Optional[int] = None) -> str:
    """PROTOTYPE of a proposed model/layers.py change (benchmark-only, registered as an attention implementation of
    the layer): a self-attention (Lq == Lk, no bias) calls `jax.nn.dot_product_attention(..., is_causal=True)` with NO dense
    mask, so cuDNN skips the masked blocks and needs no [B, 1, L, L] bias (whose gradient it also writes).
    Exact for causal masks over right-padded or unpadded rows -- every self-attention of training except the
    joint middle group, whose slots carry padding inside.  dense_len: a self-attention of that length (the
    joint middle group and the teacher's independent pass, both k*l long) keeps the library path, which is
    what the proposed library change does (`attn=cudnn_causal`); None makes it causal too, exact only for full
    passages as in this benchmark (`attn=cudnn_causal_all`: what packing the passages would allow).  The
    prompt's attention over [passage K/V ; own keys] (Lk > Lq) keeps the library path.
    Returns the `ModelConfig.attention_impl` name it is registered under (`model.layers.register_attention`).
    """
    import jax

    from imprag_jax.model import layers

    on_gpu = jax.default_backend() == "gpu"
    name = "cudnn_causal_all" if dense_len is None else f"cudnn_causal_dense{dense_len}"
    if name in _REGISTERED:
        return name

    def attention(q, k, v, mask, bias=None):
        if bias is None and q.shape[1] == k.shape[1] and (dense_len is None or q.shape[1] != dense_len):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                implementation="cudnn" if on_gpu else "xla")
        if on_gpu:
            return layers.dot_product_attention(q, k, v, mask, bias, implementation="cudnn")
        return layers.xla_attention(q, k, v, mask, bias)

    _REGISTERED[name] = layers.register_attention(name, attention)
    return name


def cudnn_traced_off_gpu() -> str:
    """--dry-run on a machine without a GPU: the library's cuDNN path (the same `jax.nn.dot_product_attention`
    call, same q/k/v/mask/bias shapes) with implementation="xla", as a registered attention implementation."""
    import functools

    from imprag_jax.model import layers

    name = "cudnn_traced_as_xla"
    if name not in _REGISTERED:
        _REGISTERED[name] = layers.register_attention(
            name, functools.partial(layers.dot_product_attention, implementation="xla"))
    return name


def attention_impl(attn: str, kind: str, shape, on_gpu: bool) -> str:
    """The ModelConfig.attention_impl of a variant's attn= value."""
    if attn.startswith("cudnn_causal"):
        return causal_attention(None if (attn == "cudnn_causal_all" or kind == "plain") else shape.k * shape.l)
    if attn == "cudnn":
        return "cudnn" if on_gpu else cudnn_traced_off_gpu()
    return "xla"


# ================================================================================================ measuring
def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "n_devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


def spec_peak(info: dict, dtype: str) -> Optional[float]:
    if info["backend"] != "gpu" or dtype != "bfloat16":
        return None
    for name, peak in GPU_PEAKS:
        if name.lower() in info["device_kind"].lower():
            return peak
    return None


def matmul_fn(n: int, dtype: str):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()

    def run():
        t = time.perf_counter()
        f(a, b).block_until_ready()
        return time.perf_counter() - t

    return run, 2.0 * n ** 3


def xla_flops(compiled) -> Optional[float]:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


_HLO_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")
_HLO_DOT = re.compile(r" dot\(%([\w.\-]+), %([\w.\-]+)\)")
_HLO_LHS_C = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def hlo_dot_flops(compiled) -> Optional[float]:
    """2 x output elements x contracted size summed over every `dot` of the optimised HLO (each computation,
    so a loop body counts once, as in cost_analysis)."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        return None
    shapes, dots = {}, []
    for line in text.splitlines():
        m = _HLO_DEF.match(line)
        if not m:
            continue
        shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
        if " dot(" in line:
            dots.append((m.group(1), line))
    total = 0.0
    for name, line in dots:
        ops, lc = _HLO_DOT.search(line), _HLO_LHS_C.search(line)
        if not ops or not lc or ops.group(1) not in shapes:
            return None
        lhs = shapes[ops.group(1)]
        kdim = math.prod(lhs[int(i)] for i in lc.group(1).split(",") if i)
        total += 2.0 * math.prod(shapes[name]) * kdim
    return total


def memory_bytes(compiled) -> dict:
    from imprag_jax.train.state import memory_report

    try:
        return memory_report(compiled)
    except Exception:  # noqa: BLE001
        return {}


# ================================================================================================ CPU comparison
def compile_steps(cfg, shape: Shape, mesh, tx, steps=STEPS, ce_chunk: int = 0):
    """{step: (callable(state) -> state, compile seconds, compiled)} for the four steps on fixed random batches."""
    import jax
    import jax.numpy as jnp

    from imprag_jax.train.state import compile_step
    from imprag_jax.train.step import BATCH_KEYS, StepConfig

    sc = StepConfig(r_len=shape.L_r)
    ib = random_batch(shape, cfg.vocab_size)
    pb = plain_batch(shape, cfg.vocab_size)
    shapes = {k: (ib[k].shape, ib[k].dtype) for k in BATCH_KEYS}
    out = {}
    for step in steps:
        t0 = time.perf_counter()
        if step.startswith("plain"):
            comp = compile_plain(cfg, tx, mesh, shape, "lm" if step == "plain_lm" else "resp",
                                 ce_chunk if step == "plain_lm" else 0)
            batch = {k: jnp.asarray(v) for k, v in pb.items()}
            fn = (lambda c, b: lambda s: c(s, b)[0])(comp, batch)
            raw = comp
        else:
            cs, sh = compile_step(cfg, sc, step, tx, mesh, shapes)
            batch = {k: jax.device_put(ib[k], sh["batch"][k]) for k in BATCH_KEYS}
            fn = (lambda c, b: lambda s: c(s, b, jnp.float32(0))[0])(cs, batch)
            raw = cs.compiled
        out[step] = (fn, time.perf_counter() - t0, raw)
        log(f"  compiled {step} in {out[step][1]:.1f}s")
    return out


def xla_check(cfg, shape: Shape, mesh, tx, steps=STEPS) -> dict:
    """Analytic impl FLOPs vs XLA.  XLA counts a while-loop (scan) body once, so the steps are compiled for a
    model whose every scan has at least two trips (N = 7, b = 2, t = 4; the plain step N = 2 -- no loop gets
    simplified away) and compared with the analytic count of ONE body per loop.  Two XLA figures: the dot
    FLOPs read from the optimised HLO (matmuls only, what the analytic count models) and cost_analysis()'s
    total (which adds the elementwise work: softmax, norms, RoPE, AdamW)."""
    compiled_cfg = {"imprag": cfg.replace(num_layers=7, b=2, t=4), "plain": cfg.replace(num_layers=2, b=0, t=1)}
    once = dict(bottom=1, mid=1, mid_full=1, top=1, plain=1)
    res = {}
    for step in steps:
        g = "plain" if step.startswith("plain") else "imprag"
        c = compiled_cfg[g]
        try:
            comp = compile_steps(c, shape, mesh, tx, (step,))[step][2]
            x = xla_flops(comp)
            xd = hlo_dot_flops(comp)
        except Exception as e:  # noqa: BLE001
            res[step] = {"error": repr(e)[:300]}
            continue
        a = flops_total(c, shape, step, impl=True, counts=once)
        res[step] = {"compiled_layers_N_b_t": [c.num_layers, c.b, c.t], "xla_dot_flops": xd,
                     "xla_cost_analysis_flops": x, "analytic_impl_flops": a,
                     "analytic_model_flops": flops_total(c, shape, step, counts=once),
                     "xla_dot_over_impl": (xd / a) if xd else None, "xla_total_over_impl": (x / a) if x else None}
    return res


def run_cpu(args) -> dict:
    import jax

    from imprag_jax.model.sharding import make_mesh
    from imprag_jax.train.state import create_state
    from imprag_jax.train.step import make_optimizer

    info = device_info()
    B, k, L_q, L_r, l = DEFAULT_GEOMETRY[args.shape]
    shape = Shape(args.shape, args.batch or B, args.k if args.k is not None else k, args.L_q or L_q,
                  args.L_r or L_r, args.l or l, args.plain_T)
    dtype = args.dtype or ("float32" if info["backend"] == "cpu" else None)
    cfg = model_config(args.shape, dtype=dtype, remat=args.remat, attention_impl="xla")
    mesh = make_mesh(devices=jax.devices()[:1])
    tx, _ = make_optimizer(1e-4, 1000, 10)
    log(f"shape {shape}  model {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {cfg.dtype}, remat {cfg.remat})")
    steps = tuple(s for s in args.steps.split(",") if s)
    compiled = compile_steps(cfg, shape, mesh, tx, steps, args.ce_chunk)
    state = create_state(cfg, tx, mesh, jax.random.key(0))
    mm, mm_flops = matmul_fn(args.matmul_n, "float32" if info["backend"] == "cpu" else "bfloat16")

    # warm up each once, then rounds of A, B, C, ... (one state chained through all of them)
    for s in steps:
        state = compiled[s][0](state)
    jax.block_until_ready(state)
    times = {s: [] for s in steps}
    mm_times = []
    for r in range(args.repeat):
        mm_times.append(min(mm() for _ in range(2)))
        for s in steps:
            t = time.perf_counter()
            state = compiled[s][0](state)
            jax.block_until_ready(state)
            times[s].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{args.repeat}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in steps)
            + f", matmul {mm_flops / mm_times[-1] / 1e9:.1f} GFLOP/s")
    peak_measured = mm_flops / float(np.median(mm_times))
    peak_spec = spec_peak(info, cfg.dtype)
    peak = peak_spec or peak_measured
    result = {"steps": {}, "ratios": {}, "targets": {}}
    for s in steps:
        t = float(np.median(times[s]))
        br = flops_breakdown(cfg, shape, s, ce_chunk=args.ce_chunk if s == "plain_lm" else 0)
        mf = sum(br.values())
        imf = flops_total(cfg, shape, s, impl=True, ce_chunk=args.ce_chunk if s == "plain_lm" else 0)
        raw = compiled[s][2]
        result["steps"][s] = {
            "tokens": shape.tokens(s), "step_s": t, "step_s_all": times[s], "tokens_per_s": shape.tokens(s) / t,
            "model_flops": mf, "model_flops_by_component": br, "model_flops_by_group": group_totals(br),
            "impl_flops": imf, "model_flops_per_s": mf / t, "mfu": mf / t / peak,
            "mfu_vs_measured_matmul": mf / t / peak_measured, "impl_flops_per_s": imf / t,
            "compile_s": compiled[s][1], "xla_flops_full_model": xla_flops(raw), "memory": memory_bytes(raw)}
    st = result["steps"]
    for num in ("warmup", "distill"):
        for den in ("plain_lm", "plain_lm_resp"):
            if num in st and den in st:
                result["ratios"][f"{num}_over_{den}"] = {
                    "time": st[num]["step_s"] / st[den]["step_s"],
                    "model_flops": st[num]["model_flops"] / st[den]["model_flops"],
                    "impl_flops": st[num]["impl_flops"] / st[den]["impl_flops"],
                    "per_round_time": [a / b for a, b in zip(times[num], times[den])]}
    for num, tgt in (("warmup", 1.0), ("distill", 2.0)):
        for den in ("plain_lm", "plain_lm_resp"):
            key = f"{num}_over_{den}"
            if key in result["ratios"]:
                v = result["ratios"][key]["time"]
                result["targets"][key] = {"target_max": tgt, "measured": v, "met": bool(v <= tgt)}
    result["peak"] = {"measured_matmul_flops_per_s": peak_measured, "matmul_n": args.matmul_n,
                      "matmul_dtype": "float32" if info["backend"] == "cpu" else "bfloat16",
                      "matmul_s_all": mm_times, "spec_flops_per_s": peak_spec,
                      "mfu_basis": "spec bf16 dense peak" if peak_spec else "MFU vs measured matmul peak"}
    del state
    gc.collect()
    if not args.skip_xla_check:
        log("XLA cost_analysis check (two layers per group vs one loop body)")
        result["xla_check"] = xla_check(cfg, shape, mesh, tx, steps)
    result["shape"] = dataclasses.asdict(shape) | {"T": shape.T, "L": shape.L}
    result["model"] = {k: v for k, v in cfg.to_dict().items() if k not in ("rope_scaling",)} | {
        "num_params": cfg.num_params()}
    return result


# ================================================================================================ GPU suite
# variant grammar: "<plain|warmup|distill>:key=value,..."  keys: B, T (plain), k, L_q, L_r, l, remat
# Bf, Lf, Lfr (ImpRAG steps: retrieval-free rows of Lf tokens, the last Lfr scored, as the training configs mix in)
# (none|full|dots|dots_no_batch), attn (xla | cudnn = the library's path | cudnn_causal = the prototype above, as
# the proposed library change | cudnn_causal_all = also the joint middle group),
# ce (full | chunk size, plain only), donate (1|0)
GPU_SUITE = (  # priority order: what is left when the budget runs out is skipped
    "plain:B=4,T=2048,remat=full,attn=xla",                          # the naive reference (26.7% on an H200)
    "plain:B=4,T=2048,remat=dots_no_batch,attn=cudnn_causal,ce=512",  # best guess, plain
    "warmup:B=4,remat=full,attn=xla",
    "warmup:B=4,remat=dots_no_batch,attn=cudnn_causal",               # best guess, ImpRAG warmup
    "plain:B=4,T=2048,remat=full,attn=cudnn",                         # the library's cuDNN path (dense mask)
    "warmup:B=4,remat=full,attn=cudnn",
    "warmup:B=4,remat=dots_no_batch,attn=cudnn_causal_all",           # + the joint middle group causal too
    "plain:B=4,T=2048,remat=dots_no_batch,attn=xla,ce=512",           # remat policy alone
    "warmup:B=4,remat=dots_no_batch,attn=xla",
    "plain:B=8,T=2048,remat=full,attn=cudnn_causal,ce=512",           # batch
    "warmup:B=8,remat=full,attn=cudnn_causal",
    "distill:B=4,remat=dots_no_batch,attn=cudnn_causal",
    "plain:B=4,T=2048,remat=full,attn=xla,donate=0",                  # donation
)

# the SmolLM2 training step as configs/smollm2.py runs it on a GPU (64 retrieval rows with k = 10 passages of 128
# tokens, 64 + 16 prompt/response tokens, 16 retrieval-free rows of 224 tokens; remat dots_no_batch, XLA
# attention), both stages, then the cuDNN attention levers
SMOLLM2_ROW = "B=64,Bf=16,Lf=224,Lfr=32,remat=dots_no_batch"
SMOLLM2_GPU_SUITE = (
    f"warmup:{SMOLLM2_ROW},attn=xla",
    f"distill:{SMOLLM2_ROW},attn=xla",
    f"warmup:{SMOLLM2_ROW},attn=cudnn_causal",
    f"distill:{SMOLLM2_ROW},attn=cudnn_causal",
    "warmup:B=64,remat=dots_no_batch,attn=xla",                       # without the retrieval-free rows
)
GPU_SUITES = {"smollm2": SMOLLM2_GPU_SUITE}


def parse_variant(spec: str) -> dict:
    kind, _, rest = spec.partition(":")
    if kind not in ("plain", "warmup", "distill"):
        raise ValueError(f"variant {spec!r}: kind must be plain/warmup/distill")
    kv = dict(x.split("=", 1) for x in rest.split(",") if x)
    if kv.get("attn", "xla") not in ("xla", "cudnn", "cudnn_causal", "cudnn_causal_all"):
        raise ValueError(f"variant {spec!r}: attn must be xla, cudnn, cudnn_causal or cudnn_causal_all")
    if kind == "distill" and kv.get("attn") == "cudnn_causal_all":
        # the teacher's independent middle pass is block-diagonal at Lq == Lk: it would silently become joint
        raise ValueError(f"variant {spec!r}: attn=cudnn_causal_all is not valid for distill (use cudnn_causal)")
    return {"spec": spec, "kind": kind, **kv}


def run_variant(v: dict, base: str, steps: int, dry: bool, info: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from imprag_jax.model.sharding import make_mesh
    from imprag_jax.train.state import compile_step, create_state
    from imprag_jax.train.step import StepConfig, make_optimizer, step_keys

    B0, k0, Lq0, Lr0, l0 = DEFAULT_GEOMETRY[base]
    kind = v["kind"]
    shape = Shape(base, int(v.get("B", B0)), int(v.get("k", k0)), int(v.get("L_q", Lq0)), int(v.get("L_r", Lr0)),
                  int(v.get("l", l0)), int(v["T"]) if (kind == "plain" and "T" in v) else None,
                  *((int(v.get("Bf", 0)), int(v.get("Lf", 0)), int(v.get("Lfr", 0))) if kind != "plain" else ()))
    if dry:  # the same plumbing, tiny and short
        shape = dataclasses.replace(shape, name="tiny", B=2, k=3, L_q=12, L_r=4, l=8,
                                    plain_T=32 if shape.plain_T else None, Bf=min(shape.Bf, 2),
                                    Lf=16 if shape.Bf else 0, Lfr=4 if shape.Bf else 0)
    attn = v.get("attn", "xla")
    on_gpu = info["backend"] == "gpu"
    dtype = "bfloat16" if on_gpu else "float32"
    cfg = model_config("tiny" if dry else base, dtype=dtype, remat=v.get("remat", "full"),
                       attention_impl=attention_impl(attn, kind, shape, on_gpu))
    ce = 0 if v.get("ce", "full") == "full" else int(v["ce"])
    donate = v.get("donate", "1") != "0"
    step_name = {"plain": "plain_lm", "warmup": "warmup", "distill": "distill"}[kind]
    mesh = make_mesh(devices=jax.devices()[:1])
    tx, _ = make_optimizer(1e-4, 1000, 10)
    t0 = time.perf_counter()
    if kind == "plain":
        comp = compile_plain(cfg, tx, mesh, shape, "lm", ce, donate)
        pb = {k: jnp.asarray(x) for k, x in plain_batch(shape, cfg.vocab_size).items()}
        call = lambda s: comp(s, pb)
        raw = comp
    else:
        ib = random_batch(shape, cfg.vocab_size)
        keys = step_keys(ib)
        cs, sh = compile_step(cfg, StepConfig(r_len=shape.L_r, r_len_free=shape.Lfr), kind, tx, mesh,
                              {k: (ib[k].shape, ib[k].dtype) for k in keys})
        b = {k: jax.device_put(ib[k], sh["batch"][k]) for k in keys}
        call = lambda s: cs(s, b, jnp.float32(0))
        raw = cs.compiled
    compile_s = time.perf_counter() - t0
    state = create_state(cfg, tx, mesh, jax.random.key(0))
    state, m = call(state)
    loss = float(m["loss"])
    jax.block_until_ready(state)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = call(state)
        jax.block_until_ready(state)
        ts.append(time.perf_counter() - t)
    del state
    t = float(np.median(ts))
    mf = flops_total(cfg, shape, step_name, ce_chunk=ce)
    return {"spec": v["spec"], "kind": kind, "step": step_name, "shape": dataclasses.asdict(shape) | {"T": shape.T},
            "remat": cfg.remat, "attn": attn, "ce_chunk": ce, "donate": donate, "dtype": cfg.dtype,
            "compile_s": compile_s, "step_s": t, "step_s_all": ts, "tokens": shape.tokens(step_name),
            "tokens_per_s": shape.tokens(step_name) / t, "model_flops": mf,
            "impl_flops": flops_total(cfg, shape, step_name, impl=True, ce_chunk=ce),
            "model_flops_per_s": mf / t, "first_loss": loss, "memory": memory_bytes(raw)}


def run_gpu_suite(args, partial=None) -> dict:
    import jax

    info = device_info()
    dry = args.dry_run
    budget = args.budget_s
    start = time.perf_counter()
    suite = GPU_SUITES.get(args.shape, GPU_SUITE)
    variants = [parse_variant(s) for s in (args.variants.split(";") if args.variants else suite)]
    on_gpu = info["backend"] == "gpu"
    if not on_gpu and not dry:
        raise SystemExit("--suite gpu needs a GPU (use --dry-run to check the plumbing on a CPU)")
    mm, mm_flops = matmul_fn(256 if dry else 8192, "float32" if not on_gpu else "bfloat16")
    mm_s = float(np.median([mm() for _ in range(5)]))
    peak_measured = mm_flops / mm_s
    peak_spec = spec_peak(info, "bfloat16" if on_gpu else "float32")
    peak = peak_spec or peak_measured
    print(f"device {info['device_kind']} ({info['backend']}), jax {info['jax']}; bf16 matmul "
          f"{peak_measured / 1e12:.1f} TFLOP/s measured, spec peak "
          f"{(peak_spec or float('nan')) / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    est = None  # seconds the last variant took (compile + steps): skip what would overrun the budget
    for v in variants:
        left = budget - (time.perf_counter() - start)
        need = 1.2 * est if est else 30.0
        if not dry and left < need:
            rows.append({"spec": v["spec"], "skipped": f"time budget ({left:.0f}s left, ~{need:.0f}s needed)"})
            print(f"{v['spec']:<62} SKIPPED (budget)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            row = run_variant(v, args.shape, args.gpu_steps if not dry else 1, dry, info)
            row["mfu"] = row["model_flops_per_s"] / peak
            row["mfu_vs_measured_matmul"] = row["model_flops_per_s"] / peak_measured
            print(f"{v['spec']:<62} {row['step_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:9.0f} tok/s  "
                  f"MFU {100 * row['mfu']:5.1f}%  (vs matmul {100 * row['mfu_vs_measured_matmul']:5.1f}%)  "
                  f"compile {row['compile_s']:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - an OOM or an unsupported cuDNN shape must not stop the suite
            row = {"spec": v["spec"], "error": f"{type(e).__name__}: {str(e)[:600]}"}
            print(f"{v['spec']:<62} ERROR {row['error'][:300]}", flush=True)
            if args.verbose:
                traceback.print_exc()
        est = max(est or 0.0, time.perf_counter() - t0)
        rows.append(row)
        if partial is not None:  # keep what is done if the call is cut off
            partial({"suite": "gpu", "dry_run": dry, "variants": rows, "partial": True})
        gc.collect()
        jax.clear_caches()
    best = {}
    targets = {"plain": 0.45, "warmup": 0.40} if args.shape == "llama3_3b" else {}  # the 3B MFU targets only
    for kind, target in ((k, targets.get(k)) for k in ("plain", "warmup", "distill")):
        ok = [r for r in rows if r.get("kind") == kind and "mfu" in r]
        if ok:
            b = max(ok, key=lambda r: r["mfu"])
            best[kind] = {"spec": b["spec"], "mfu": b["mfu"], "target_min": target,
                          "met": None if (target is None or dry) else bool(b["mfu"] >= target)}
    return {"suite": "gpu", "dry_run": dry, "variants": rows, "best": best, "budget_s": budget,
            "elapsed_s": time.perf_counter() - start,
            "peak": {"spec_flops_per_s": peak_spec, "measured_matmul_flops_per_s": peak_measured,
                     "mfu_basis": "spec bf16 dense peak" if peak_spec else "MFU vs measured matmul peak"}}


# ================================================================================================ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--shape", default=None, help="tiny | smollm2 | llama3_1b | llama3_3b | llama3_8b")
    ap.add_argument("--quick", action="store_true", help="CI: tiny shape, 2 timed rounds, no timing claims")
    ap.add_argument("--suite", default="cpu", choices=("cpu", "gpu"),
                    help="cpu: the four steps interleaved; gpu: the lever variants, one after another")
    ap.add_argument("--k", type=int, default=None, help="passages per example")
    ap.add_argument("--batch", type=int, default=None, help="examples per step")
    ap.add_argument("--L-q", dest="L_q", type=int, default=None)
    ap.add_argument("--L-r", dest="L_r", type=int, default=None)
    ap.add_argument("--l", type=int, default=None, help="passage length")
    ap.add_argument("--plain-T", type=int, default=None, help="plain step length (default: the same tokens)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, the preset's on GPU)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--ce-chunk", type=int, default=0, help="plain_lm: chunked cross-entropy (positions/chunk)")
    ap.add_argument("--steps", default=",".join(STEPS), help="which of " + ",".join(STEPS))
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (each runs every step once)")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the peak-measuring matmul")
    ap.add_argument("--skip-xla-check", action="store_true")
    ap.add_argument("--variants", default=None, help="gpu suite: ';'-separated variant specs (see GPU_SUITE)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="gpu suite: wall-clock budget")
    ap.add_argument("--gpu-steps", type=int, default=5, help="gpu suite: timed steps per variant")
    ap.add_argument("--dry-run", action="store_true", help="gpu suite on a tiny model, 1 step (CPU plumbing check)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape = args.shape or "tiny"
        args.repeat = min(args.repeat, 2)
    args.shape = args.shape or ("llama3_3b" if args.suite == "gpu" else "smollm2")
    if args.matmul_n is None:
        args.matmul_n = 512 if args.shape == "tiny" else 2048

    import jax

    t0 = time.perf_counter()
    out = {"schema": SCHEMA, "date": datetime.date.today().isoformat(), "argv": sys.argv[1:] if argv is None else argv,
           "machine": device_info(), "quick": bool(args.quick), "env": {
               k: os.environ[k] for k in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
               if k in os.environ}}
    def dump(extra):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out | extra, f, indent=1, default=float)

    if args.suite == "gpu":
        out.update(run_gpu_suite(args, dump))
        for kind, b in out["best"].items():
            tgt = "" if b["met"] is None else (f"  target >= {100 * b['target_min']:.0f}%: "
                                               + ("met" if b["met"] else "NOT met"))
            print(f"best {kind:<8} MFU {100 * b['mfu']:5.1f}%  {b['spec']}{tgt}", flush=True)
    else:
        out.update(run_cpu(args))
        st = out["steps"]
        log("")
        log(f"{'step':<15}{'s/step':>9}{'tok/s':>10}{'model GFLOP':>13}{'MFU':>8}   ({out['peak']['mfu_basis']}: "
            f"{out['peak']['measured_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
        for s, r in st.items():
            log(f"{s:<15}{r['step_s']:9.3f}{r['tokens_per_s']:10.1f}{r['model_flops'] / 1e9:13.1f}"
                f"{100 * r['mfu']:7.1f}%")
        for key, r in out["ratios"].items():
            log(f"{key:<32} time {r['time']:.3f}x   model FLOPs {r['model_flops']:.3f}x   impl FLOPs "
                f"{r['impl_flops']:.3f}x")
        for key, r in out.get("xla_check", {}).items():
            if r.get("xla_dot_over_impl"):
                log(f"xla check {key:<14} analytic impl {r['analytic_impl_flops'] / 1e9:.3f} GFLOP; XLA dots "
                    f"{r['xla_dot_over_impl']:.4f}x, cost_analysis total {r['xla_total_over_impl'] or 0:.4f}x")
    out["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=float)
    log(f"wrote {args.json} ({out['wall_s']:.0f}s)")
    return out


if __name__ == "__main__":
    main()
