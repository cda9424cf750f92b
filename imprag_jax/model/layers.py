"""Flax (linen) building blocks of the Llama decoder: RMSNorm, rotary embeddings (incl. llama3 scaling), grouped-query
attention with an optional key/value prefix (the retrieved passages), SwiGLU MLP, one decoder layer, embeddings.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); every large activation is constrained
with `sharding.constrain`. Parameters are stored in `param_dtype` (fp32) and cast to the compute `dtype`.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .sharding import constrain

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax instead of NaN


def _dt(name: str):
    return jnp.dtype(name)


def _init(cfg: ModelConfig, names, scale: float = 1.0):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std * scale), names)


# ---------------------------------------------------------------------------------------------------- rotary
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs is not None and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wl >= hi_wl) & (wl <= lo_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x: [..., L, heads, head_dim]; positions: [..., L] (int). Rotate-half convention (Hugging Face Llama)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., L, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[..., None, :]  # [..., L, 1, D]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), _dt(self.cfg.param_dtype))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(_dt(self.cfg.dtype))


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embedding = self.param("embedding", _init(c, ("vocab", "embed"), scale=1.0),
                                    (c.vocab_size, c.hidden_size), _dt(c.param_dtype))

    def __call__(self, tokens):
        x = jnp.take(self.embedding, tokens, axis=0).astype(_dt(self.cfg.dtype))
        if self.cfg.embed_scale != 1.0:
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def attend(self, h):
        """Tied output head: h @ embedding.T in the compute dtype, fp32 logits."""
        w = self.embedding.astype(_dt(self.cfg.dtype))
        return jnp.einsum("bld,vd->blv", h, w, preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        w = self.param("kernel", _init(c, ("embed", "vocab")), (c.hidden_size, c.vocab_size), _dt(c.param_dtype))
        return jnp.einsum("bld,dv->blv", h, w.astype(_dt(c.dtype)), preferred_element_type=jnp.float32)


def attention(q, k, v, mask, bias=None, impl: str = "xla"):
    """Grouped-query attention with implementation `impl` (`ModelConfig.attention_impl`).

    q: [B, Lq, H, D]; k, v: [B, Lk, KV, D]; mask: bool broadcastable to [B, Lq, Lk];
    bias: optional additive fp32 logits bias broadcastable to [B, Lq, Lk]. Returns [B, Lq, H, D].
    """
    return _IMPLS[impl](q, k, v, mask, bias)


def xla_attention(q, k, v, mask, bias=None):
    """The einsum implementation: fp32 logits and softmax, masked with a finite -1e30."""
    B, Lq, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    qg = q.reshape(B, Lq, KV, G, D)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias, (B, Lq, k.shape[1]))[:, None, None]
    m = jnp.broadcast_to(mask, (B, Lq, k.shape[1]))[:, None, None]
    logits = jnp.where(m, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, Lq, H, D).astype(q.dtype)


def dot_product_attention(q, k, v, mask, bias=None, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention` with the dense mask and bias (implementation "cudnn": the GPU kernel)."""
    B, Lq = q.shape[:2]
    full_bias = None
    if bias is not None:
        full_bias = jnp.broadcast_to(bias, (B, Lq, k.shape[1]))[:, None].astype(q.dtype)
    m = jnp.broadcast_to(mask, (B, Lq, k.shape[1]))[:, None]
    return jax.nn.dot_product_attention(q, k, v, bias=full_bias, mask=m, implementation=implementation)


_IMPLS = {"xla": xla_attention, "cudnn": dot_product_attention}


def register_attention(name: str, fn) -> str:
    """Add an attention implementation `fn(q, k, v, mask, bias)` under `name`, selectable as
    `ModelConfig(attention_impl=name)` (e.g. a kernel being measured). A name is bound once: compiled functions
    are cached by the config, so one name must always mean one function. Returns the name."""
    from .config import ATTENTION_IMPLS

    if name in _IMPLS and _IMPLS[name] is not fn:
        raise ValueError(f"attention implementation {name!r} is already registered")
    _IMPLS[name] = fn
    ATTENTION_IMPLS.add(name)
    return name


class Attention(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        pd = _dt(c.param_dtype)
        self.wq = self.param("wq", _init(c, ("embed", "heads", "head_dim")), (c.hidden_size, c.num_heads, c.head_dim), pd)
        self.wk = self.param("wk", _init(c, ("embed", "kv_heads", "head_dim")), (c.hidden_size, c.num_kv_heads, c.head_dim), pd)
        self.wv = self.param("wv", _init(c, ("embed", "kv_heads", "head_dim")), (c.hidden_size, c.num_kv_heads, c.head_dim), pd)
        self.wo = self.param("wo", _init(c, ("heads", "head_dim", "embed"), scale=1.0 / math.sqrt(2 * c.num_layers)),
                             (c.num_heads, c.head_dim, c.hidden_size), pd)

    def _w(self, w):
        return w.astype(_dt(self.cfg.dtype))

    def project_q(self, h):
        return constrain(jnp.einsum("bld,dhk->blhk", h, self._w(self.wq)), ("batch", "length", "act_heads", None))

    def project_k(self, h):
        return constrain(jnp.einsum("bld,dhk->blhk", h, self._w(self.wk)), ("batch", "length", "act_kv_heads", None))

    def project_v(self, h):
        return constrain(jnp.einsum("bld,dhk->blhk", h, self._w(self.wv)), ("batch", "length", "act_kv_heads", None))

    def output(self, o):
        return constrain(jnp.einsum("blhk,hkd->bld", o, self._w(self.wo)), ("batch", "length", "act_embed"))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        pd, dt = _dt(c.param_dtype), _dt(c.dtype)
        wg = self.param("w_gate", _init(c, ("embed", "mlp")), (c.hidden_size, c.intermediate_size), pd)
        wu = self.param("w_up", _init(c, ("embed", "mlp")), (c.hidden_size, c.intermediate_size), pd)
        wd = self.param("w_down", _init(c, ("mlp", "embed"), scale=1.0 / math.sqrt(2 * c.num_layers)),
                        (c.intermediate_size, c.hidden_size), pd)
        g = jnp.einsum("bld,df->blf", h, wg.astype(dt))
        u = jnp.einsum("bld,df->blf", h, wu.astype(dt))
        a = constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return constrain(jnp.einsum("blf,fd->bld", a, wd.astype(dt)), ("batch", "length", "act_embed"))


class DecoderLayer(nn.Module):
    """One Llama layer. `__call__` is the plain layer; the ImpRAG data flows use its methods:

    * `__call__(x, pos, mask, prefix=None, prefix_mask=None, prefix_bias=None, return_kv=False)`:
      self-attention (causal mask given by the caller) optionally over a key/value prefix placed before the
      sequence's own keys in one softmax; returns the new hidden states (and the rotated k, v when asked).
    * `retrieval_q(h)` / `retrieval_k(h)`: layer-input hidden states -> the normalised q/k projections (no RoPE).
    """

    cfg: ModelConfig

    def setup(self):
        self.input_norm = RMSNorm(self.cfg)
        self.attn = Attention(self.cfg)
        self.post_attn_norm = RMSNorm(self.cfg)
        self.mlp = MLP(self.cfg)

    def __call__(self, x, pos, mask, prefix=None, prefix_mask=None, prefix_bias=None, return_kv=False,
                 skip_mlp=False, cache=None):
        c = self.cfg
        inv = rope_inv_freq(c)
        h = self.input_norm(x)
        q = apply_rope(self.attn.project_q(h), pos, inv)
        k = apply_rope(self.attn.project_k(h), pos, inv)
        v = self.attn.project_v(h)
        new_kv = (k, v)
        if cache is not None:  # decoding: cache = (k_cache [B,S,KV,D], v_cache, write_index); mask covers the cache
            kc, vc, idx = cache
            kc = jax.lax.dynamic_update_slice_in_dim(kc, k.astype(kc.dtype), idx, axis=1)
            vc = jax.lax.dynamic_update_slice_in_dim(vc, v.astype(vc.dtype), idx, axis=1)
            new_kv = (kc, vc)
            k, v = kc.astype(q.dtype), vc.astype(q.dtype)
        bias = None
        if prefix is not None:
            pk, pv = prefix
            k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
            B, Lq = q.shape[:2]
            pm = jnp.broadcast_to(prefix_mask, (B, Lq, pk.shape[1]))
            mask = jnp.concatenate([pm, jnp.broadcast_to(mask, (B, Lq, mask.shape[-1]))], axis=-1)
            if prefix_bias is not None:
                bias = jnp.concatenate([jnp.broadcast_to(prefix_bias, (B, Lq, pk.shape[1])).astype(jnp.float32),
                                        jnp.zeros((B, Lq, mask.shape[-1] - pk.shape[1]), jnp.float32)], axis=-1)
        o = attention(q, k, v, mask, bias, impl=c.attention_impl)
        x = x + self.attn.output(o)
        if not skip_mlp:
            x = x + self.mlp(self.post_attn_norm(x))
        x = constrain(x, ("batch", "length", "act_embed"))
        return (x, new_kv) if return_kv else x

    def kv(self, x, pos):
        """This layer's rotated keys and values only (the passages' last middle layer needs nothing else)."""
        h = self.input_norm(x)
        return apply_rope(self.attn.project_k(h), pos, rope_inv_freq(self.cfg)), self.attn.project_v(h)

    def retrieval_q(self, x):
        return self.attn.project_q(self.input_norm(x))

    def retrieval_k(self, x):
        return self.attn.project_k(self.input_norm(x))
