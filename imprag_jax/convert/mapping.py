"""Declarative map between Hugging Face Llama tensors and imprag_jax parameters.

Each row of `LAYER_MAP` names a per-layer HF tensor, its place in the imprag_jax tree, and the hook pair that turns
one into the other (HF linears are [out, in]; imprag_jax keeps [in, heads, head_dim] / [heads, head_dim, out]).
Import and export both read this one table, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from ..model.config import ModelConfig

# ------------------------------------------------------------------ hooks (HF -> ours, ours -> HF)


def _q_in(w, c):  # [H*D, d] -> [d, H, D]
    return w.T.reshape(c.hidden_size, -1, c.head_dim)


def _qkv_out(w, c):  # [d, H, D] -> [H*D, d]
    return w.reshape(c.hidden_size, -1).T


def _o_in(w, c):  # [d, H*D] -> [H, D, d]
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_out(w, c):  # [H, D, d] -> [d, H*D]
    return w.reshape(-1, c.hidden_size).T


def _t(w, c):
    return w.T


def _id(w, c):
    return w


# (hf name inside "model.layers.{i}.", path in params["layers"], to_ours, to_hf)
LAYER_MAP = (
    ("self_attn.q_proj.weight", ("attn", "wq"), _q_in, _qkv_out),
    ("self_attn.k_proj.weight", ("attn", "wk"), _q_in, _qkv_out),
    ("self_attn.v_proj.weight", ("attn", "wv"), _q_in, _qkv_out),
    ("self_attn.o_proj.weight", ("attn", "wo"), _o_in, _o_out),
    ("mlp.gate_proj.weight", ("mlp", "w_gate"), _t, _t),
    ("mlp.up_proj.weight", ("mlp", "w_up"), _t, _t),
    ("mlp.down_proj.weight", ("mlp", "w_down"), _t, _t),
    ("input_layernorm.weight", ("input_norm", "scale"), _id, _id),
    ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), _id, _id),
)
GLOBAL_MAP = (
    ("model.embed_tokens.weight", ("embed", "embedding"), _id, _id),
    ("model.norm.weight", ("final_norm", "scale"), _id, _id),
)
HEAD_MAP = ("lm_head.weight", ("lm_head", "kernel"), _t, _t)


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def hf_to_params(get: Callable[[str], np.ndarray], cfg: ModelConfig, has: Callable[[str], bool] = None,
                 dtype=np.float32) -> dict:
    """Build the imprag_jax parameter tree from HF tensors. `get(name)` returns a numpy array."""
    params: dict = {}
    for name, path, hook, _ in GLOBAL_MAP:
        _set(params, path, np.asarray(hook(get(name), cfg), dtype))
    stacks = {path: [] for _, path, _, _ in LAYER_MAP}
    for i in range(cfg.num_layers):
        for name, path, hook, _ in LAYER_MAP:
            stacks[path].append(np.asarray(hook(get(f"model.layers.{i}.{name}"), cfg), dtype))
    for path, arrs in stacks.items():
        _set(params, ("layers",) + path, np.stack(arrs))
    if not cfg.tie_embeddings:
        name, path, hook, _ = HEAD_MAP
        if has is not None and not has(name):
            raise KeyError(f"config says untied embeddings but the checkpoint has no {name}")
        _set(params, path, np.asarray(hook(get(name), cfg), dtype))
    _check_shapes(params, cfg)
    return params


def params_to_hf(params, cfg: ModelConfig, dtype=np.float32) -> Dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: a flat {hf_name: array} dict (scanned layers unstacked)."""
    out = {}
    for name, path, _, hook in GLOBAL_MAP:
        out[name] = np.ascontiguousarray(np.asarray(hook(np.asarray(_get(params, path)), cfg), dtype))
    for name, path, _, hook in LAYER_MAP:
        stacked = np.asarray(_get(params["layers"], path))
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(np.asarray(hook(stacked[i], cfg), dtype))
    if not cfg.tie_embeddings:
        name, path, _, hook = HEAD_MAP
        out[name] = np.ascontiguousarray(np.asarray(hook(np.asarray(_get(params, path)), cfg), dtype))
    return out


def _check_shapes(params, cfg):
    import jax

    from ..model.transformer import param_shapes

    want = param_shapes(cfg)
    got = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda s: s.shape, want)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise ValueError(f"converted parameters do not match the config: got {got}, expected {want}")


# ------------------------------------------------------------------ configs

HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_embeddings", "rope_scaling": "rope_scaling",
    "max_position_embeddings": "max_position",
}


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a HF Llama config.json dict; b/t default to the paper's split scaled to the depth."""
    if hf.get("model_type", "llama") not in ("llama",):
        raise ValueError(f"imprag_jax reads Llama-architecture checkpoints; this one is {hf.get('model_type')!r}")
    kw = {ours: hf[theirs] for theirs, ours in HF_KEYS.items() if theirs in hf and hf[theirs] is not None}
    rp = hf.get("rope_parameters")  # newer transformers nest rope_theta/rope_scaling here
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if kw.get("rope_scaling") and kw["rope_scaling"].get("rope_type", kw["rope_scaling"].get("type")) == "default":
        kw["rope_scaling"] = None
    kw.setdefault("tie_embeddings", False)
    n = kw.get("num_layers", 32)
    kw.setdefault("b", min(7, n - 1))
    kw.setdefault("t", min(max(kw["b"], n - 9), n - 1))
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "float32", **extra) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": torch_dtype, "initializer_range": cfg.init_std,
    }
    d.update(extra)
    return d
