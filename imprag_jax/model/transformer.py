"""The ImpRAG decoder as pure functions of a parameter pytree.

Parameter layout (independent of b and t, so one checkpoint serves any layer split):
    {"embed": {"embedding": [V, d]},
     "layers": {<DecoderLayer params with a leading [num_layers] axis>},
     "final_norm": {"scale": [d]},
     "lm_head": {"kernel": [d, V]}}            # only when embeddings are untied
A layer group is a static slice of the stacked layers, run with `lax.scan` (optionally rematerialised).

Data flow of `read` (DESIGN §1-2):
    prompt   --layers[0:b]-->  h_q(b) --q-proj of layer b--> E_q
    passages --layers[0:b], each alone, positions 0..-->  h_p(b) --k-proj of layer b--> E_p
    passages --layers[b:t+1], slot j at positions j*l_max.., joint (or independent) causal--> per-layer K/V
    prompt   --layers[b:t+1] attending over [passage K/V ; own causal K/V], positions from k*l_max-->
             --layers[t+1:N] self only--> final norm --> logits
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .layers import DecoderLayer, Embed, LMHead, RMSNorm, apply_rope, rope_inv_freq
from .sharding import constrain

# ---------------------------------------------------------------------------------------------------- params


def _layer(cfg):
    return DecoderLayer(cfg)


def _dummy_inputs(cfg):
    x = jnp.zeros((1, 2, cfg.hidden_size), jnp.dtype(cfg.dtype))
    pos = jnp.zeros((1, 2), jnp.int32)
    mask = jnp.ones((1, 2, 2), bool)
    return x, pos, mask


def _boxed_init(cfg: ModelConfig, rng):
    """Initialise with flax's logical-partitioning boxes (names kept); layers stacked by vmap."""
    k_emb, k_layers, k_head = jax.random.split(rng, 3)
    # the parameters do not depend on the attention kernel; tracing the cuDNN one here would fail twice: under
    # the vmap below (its batching rule only takes a leading batch axis: seen on an H200 with jax 0.11.2) and on
    # hosts without cuDNN (compile_check, CPU tests of a GPU config)
    layer = _layer(cfg.replace(attention_impl="xla"))
    x, pos, mask = _dummy_inputs(cfg)
    keys = jax.random.split(k_layers, cfg.num_layers)
    layers = jax.vmap(lambda k: layer.init(k, x, pos, mask)["params"])(keys)
    params = {
        "embed": Embed(cfg).init(k_emb, jnp.zeros((1, 1), jnp.int32))["params"],
        "layers": layers,
        "final_norm": RMSNorm(cfg).init(k_emb, x)["params"],
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = LMHead(cfg).init(k_head, x)["params"]
    return params


def _is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)


@partial(jax.jit, static_argnums=0)
def _init_jit(cfg: ModelConfig, rng):
    return nn.meta.unbox(_boxed_init(cfg, rng))


def init_params(cfg: ModelConfig, rng) -> dict:
    """Random parameters (param_dtype, fp32 by default); jitted (eager flax init of the stacked layers is slow)."""
    return _init_jit(cfg, rng)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter, e.g. ("layers", "embed", "heads", "head_dim") for wq."""
    boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
    # vmap adds the leading layer axis to the values but not to the names: add it here
    def names(path, b):
        n = tuple(b.names)
        if path and getattr(path[0], "key", None) == "layers":
            n = ("layers",) + n
        return n

    return jax.tree_util.tree_map_with_path(names, boxed, is_leaf=_is_box)


def param_shapes(cfg: ModelConfig):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def layer_slice(params, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], params["layers"])


def _one_layer(params, i: int):
    return jax.tree.map(lambda a: a[i], params["layers"])


# ---------------------------------------------------------------------------------------------------- helpers


def positions_from_mask(mask, offset=0):
    """0-based positions of the real tokens (works for left or right padding); pad positions are clamped to 0."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0) + offset


def last_index(mask):
    """Index of the last real token of each row ([..., L] -> [...])."""
    L = mask.shape[-1]
    return L - 1 - jnp.argmax(mask[..., ::-1].astype(jnp.int32), axis=-1)


def causal_mask(mask, segments=None):
    """[B, L] validity -> [B, L, L] bool: causal, keys must be real, optionally same segment."""
    L = mask.shape[-1]
    m = jnp.tril(jnp.ones((L, L), bool))[None] & mask.astype(bool)[:, None, :]
    if segments is not None:
        m = m & (segments[:, :, None] == segments[:, None, :])
    return m


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(fn, cfg: ModelConfig):
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=False)


def _scan_layers(cfg, layer_params, body, carry, xs=None):
    """scan `body(p, carry, x) -> (carry, y)` over a stacked slice of layers (no-op for an empty slice)."""
    n = jax.tree.leaves(layer_params)[0].shape[0]
    if n == 0:
        return carry, None
    f = _maybe_remat(lambda c, inp: body(inp[0], c, inp[1]), cfg)
    return jax.lax.scan(f, carry, (layer_params, xs))


# ---------------------------------------------------------------------------------------------------- stages


def embed_tokens(params, cfg: ModelConfig, tokens):
    return Embed(cfg).apply({"params": params["embed"]}, tokens)


def logits_from_hidden(params, cfg: ModelConfig, h):
    h = RMSNorm(cfg).apply({"params": params["final_norm"]}, h)
    if cfg.tie_embeddings:
        logits = Embed(cfg).apply({"params": params["embed"]}, h, method=Embed.attend)
    else:
        logits = LMHead(cfg).apply({"params": params["lm_head"]}, h)
    return constrain(logits, ("batch", "length", "act_vocab"))


def run_self(params, cfg: ModelConfig, x, pos, mask3, start: int, stop: int):
    """Layers [start, stop) with self-attention only. x: [B, L, d]; mask3: [B, L, L]."""
    layer = _layer(cfg)

    def body(p, h, _):
        return layer.apply({"params": p}, h, pos, mask3), None

    x, _ = _scan_layers(cfg, layer_slice(params, start, stop), body, x)
    return x


def run_bottom(params, cfg: ModelConfig, tokens, mask, segments=None):
    """Embed and run layers [0, b): the hidden states at the input of layer b (positions 0.. per row)."""
    x = embed_tokens(params, cfg, tokens)
    pos = positions_from_mask(mask)
    return run_self(params, cfg, x, pos, causal_mask(mask, segments), 0, cfg.b)


def retrieval_embedding(params, cfg: ModelConfig, h_b, mask, kind: str):
    """Layer-b query ("q") or key ("k") state of each row's last real token -> [B, n_kv_heads*head_dim] fp32.

    Query heads are averaged within each GQA group so E_q lines up with the key heads. With
    retrieval_rope="post" the state is rotated at the token's own (unshifted) position. E_q carries the score
    scale (`cfg.score_multiplier`), so s(q,p) = <E_q, E_p> everywhere. With retrieval_pool="mean" the projected
    states of all real tokens are averaged instead of taking the last one.
    """
    layer = _layer(cfg)
    p = _one_layer(params, cfg.b)
    method = DecoderLayer.retrieval_q if kind == "q" else DecoderLayer.retrieval_k
    if cfg.retrieval_pool == "mean":
        s = layer.apply({"params": p}, h_b, method=method).astype(jnp.float32)  # [B, L, heads, D]
        if cfg.retrieval_rope == "post":
            s = apply_rope(s, positions_from_mask(mask), rope_inv_freq(cfg))
        w = mask.astype(jnp.float32)
        s = (s * w[:, :, None, None]).sum(1) / jnp.maximum(w.sum(1), 1.0)[:, None, None]
    else:
        idx = last_index(mask)
        h_last = jnp.take_along_axis(h_b, idx[:, None, None], axis=1)  # [B, 1, d]
        s = layer.apply({"params": p}, h_last, method=method).astype(jnp.float32)  # [B, 1, heads, D]
        if cfg.retrieval_rope == "post":
            pos = positions_from_mask(mask)
            s = apply_rope(s, jnp.take_along_axis(pos, idx[:, None], axis=1), rope_inv_freq(cfg))
        s = s[:, 0]
    if kind == "q":
        B = s.shape[0]
        s = s.reshape(B, cfg.num_kv_heads, cfg.group_size, cfg.head_dim).mean(axis=2)
        if cfg.score_multiplier != 1.0:
            s = s * cfg.score_multiplier
    return s.reshape(s.shape[0], cfg.retrieval_dim)


def query_embedding(params, cfg: ModelConfig, tokens, mask):
    """E_q: [B, D] from the prompt (layers 0..b only)."""
    h = run_bottom(params, cfg, tokens, mask)
    return retrieval_embedding(params, cfg, h, mask, "q")


def passage_embedding(params, cfg: ModelConfig, tokens, mask):
    """E_p: [N, D] and the hidden states at the input of layer b (what the middle group continues from)."""
    h = run_bottom(params, cfg, tokens, mask)
    return retrieval_embedding(params, cfg, h, mask, "k"), h


class PassageKV(NamedTuple):
    k: jax.Array  # [n_middle, B, P, KV, D] rotated keys of the passage tokens, per middle layer
    v: jax.Array  # [n_middle, B, P, KV, D]
    mask: jax.Array  # [B, P] bool: real passage tokens


def passage_slots(passage_mask, l_max: int):
    """Slot positions for k passages laid out as [B, k*l_max]: slot j starts at j*l_max."""
    B, k, L = passage_mask.shape
    inner = positions_from_mask(passage_mask)  # [B, k, L]
    return (inner + (jnp.arange(k) * l_max)[None, :, None]).reshape(B, k * L)


def passage_kv(params, cfg: ModelConfig, h_p, passage_mask, attention: Optional[str] = None) -> PassageKV:
    """Run the passages through the middle group and keep each layer's K/V.

    h_p: [B, k, L, d] hidden states at the input of layer b (from `run_bottom` of each passage alone);
    passage_mask: [B, k, L]. Passages sit in slots [j*L, (j+1)*L); attention "joint" is causal over the
    concatenation (padding masked), "independent" keeps each passage to itself.
    """
    attention = attention or cfg.passage_attention
    B, k, L, d = h_p.shape
    m = passage_mask.reshape(B, k * L).astype(bool)
    pos = passage_slots(passage_mask, L)
    if attention == "independent":
        # each passage is its own row (slot positions kept): k x fewer attention pairs than a block-diagonal
        # mask over the [k*L, k*L] square (the teacher's pass in the self-distillation step)
        x = h_p.reshape(B * k, L, d)
        pos = pos.reshape(B * k, L)
        mask3 = causal_mask(m.reshape(B * k, L))
    else:
        x = h_p.reshape(B, k * L, d)
        mask3 = causal_mask(m)
    layer = _layer(cfg)

    def body(p, h, _):
        h2, (kk, vv) = layer.apply({"params": p}, h, pos, mask3, return_kv=True)
        return h2, (kk, vv)

    # layers b..t-1 in full; layer t only needs its K/V (the passage stream ends there)
    x, kvs = _scan_layers(cfg, layer_slice(params, cfg.b, cfg.t), body, x)
    kt, vt = layer.apply({"params": _one_layer(params, cfg.t)}, x, pos, method=DecoderLayer.kv)
    ks = kt[None] if kvs is None else jnp.concatenate([kvs[0], kt[None]], 0)
    vs = vt[None] if kvs is None else jnp.concatenate([kvs[1], vt[None]], 0)
    n = ks.shape[0]  # rows back to [n, B, k*L, KV, D] (a no-op reshape for "joint")
    return PassageKV(ks.reshape(n, B, k * L, *ks.shape[3:]), vs.reshape(n, B, k * L, *vs.shape[3:]), m)


def prompt_through(params, cfg: ModelConfig, h_q, mask, pkv: Optional[PassageKV], offset, prefix_bias=None):
    """Prompt hidden states at the input of layer b -> final hidden states (middle with passage K/V, then top)."""
    pos = positions_from_mask(mask, offset)
    mask3 = causal_mask(mask)
    layer = _layer(cfg)
    if pkv is None:
        x = run_self(params, cfg, h_q, pos, mask3, cfg.b, cfg.num_layers)
        return x
    pm = pkv.mask[:, None, :]
    bias = None if prefix_bias is None else prefix_bias[:, None, :]

    def body(p, h, kv):
        return layer.apply({"params": p}, h, pos, mask3, prefix=kv, prefix_mask=pm, prefix_bias=bias), None

    x, _ = _scan_layers(cfg, layer_slice(params, cfg.b, cfg.t + 1), body, h_q, (pkv.k, pkv.v))
    return run_self(params, cfg, x, pos, mask3, cfg.t + 1, cfg.num_layers)


# ---------------------------------------------------------------------------------------------------- API


def forward(params, cfg: ModelConfig, tokens, mask=None, positions=None, return_hidden=False):
    """The plain decoder (no retrieval): logits [B, L, V] (fp32)."""
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    x = embed_tokens(params, cfg, tokens)
    pos = positions_from_mask(mask) if positions is None else positions
    x = run_self(params, cfg, x, pos, causal_mask(mask), 0, cfg.num_layers)
    return x if return_hidden else logits_from_hidden(params, cfg, x)


class ReadOutput(NamedTuple):
    logits: Optional[jax.Array]  # [B, Lq, V] (None when return_hidden)
    hidden: Optional[jax.Array]  # [B, Lq, d] final hidden states (before the final norm) when return_hidden
    e_q: jax.Array  # [B, D]
    e_p: Optional[jax.Array]  # [B, k, D]
    h_p: Optional[jax.Array]  # [B, k, L, d] passage hidden states at the input of layer b


def prompt_offset(cfg: ModelConfig, k: int, l_max: int) -> int:
    return cfg.prompt_offset if cfg.prompt_offset is not None else k * l_max


def read(params, cfg: ModelConfig, tokens, mask, passages=None, passage_mask=None, *, query_mask=None,
         prefix_bias=None, return_hidden=False) -> ReadOutput:
    """ImpRAG reading: the prompt attends to k passages in the middle group.

    tokens, mask: [B, Lq] (prompt followed by any response tokens); passages, passage_mask: [B, k, L].
    query_mask: which tokens form the query for E_q (default: `mask`; pass the prompt-only mask in training
    so E_q comes from the last prompt token, not the last response token).
    prefix_bias: optional [B, k*L] additive attention bias on the passage tokens (the score-bias extension).
    With passages=None (or k=0) this is exactly the plain decoder.
    """
    h_q = run_bottom(params, cfg, tokens, mask)
    e_q = retrieval_embedding(params, cfg, h_q, mask if query_mask is None else query_mask, "q")
    if passages is None or passages.shape[1] == 0:
        h = prompt_through(params, cfg, h_q, mask, None, 0)
        out = (None, h) if return_hidden else (logits_from_hidden(params, cfg, h), None)
        return ReadOutput(*out, e_q, None, None)
    B, k, L = passages.shape
    flat_t, flat_m = passages.reshape(B * k, L), passage_mask.reshape(B * k, L)
    h_p = run_bottom(params, cfg, flat_t, flat_m)
    e_p = retrieval_embedding(params, cfg, h_p, flat_m, "k").reshape(B, k, -1)
    h_p = h_p.reshape(B, k, L, -1)
    pkv = passage_kv(params, cfg, h_p, passage_mask)
    h = prompt_through(params, cfg, h_q, mask, pkv, prompt_offset(cfg, k, L), prefix_bias)
    out = (None, h) if return_hidden else (logits_from_hidden(params, cfg, h), None)
    return ReadOutput(*out, e_q, e_p, h_p)
