"""Read a Llama-architecture GGUF file (llama.cpp's format) into imprag_jax.

    cfg, params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

* Weights are dequantized to fp32 numpy with `gguf.quants.dequantize` (any quantization the `gguf` package knows).
  GGUF stores linears as [out, in] like Hugging Face, under llama.cpp names (`blk.{i}.attn_q.weight`, ...); they
  are renamed to HF names and handed to `mapping.hf_to_params`, so the layout logic lives in one place.
* llama.cpp's converter interleaves the rows of the Q and K projections of every head (its RoPE pairs adjacent
  dimensions, the HF layout pairs dimension i with i + head_dim/2). `unpermute_rope_rows` undoes that.
* The configuration comes from the `llama.*` metadata keys; the tokenizer (byte-level BPE) from `tokenizer.ggml.*`.
  A file without `output.weight` has tied embeddings.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..data.tokenizer import Tokenizer
from ..model.config import ModelConfig
from . import mapping

# llama.cpp tensor name (inside "blk.{i}.") -> HF name (inside "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = {"rope_freqs.weight"}  # handled separately (llama3-style frequency factors)

# tokenizer.ggml.pre values whose split is "each digit alone, then the GPT-2 regex" (llama.cpp groups these)
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# ... and those that use the GPT-2 regex alone (a file without tokenizer.ggml.pre is read this way too)
_PRE_GPT2 = {"gpt2", "mpt", "olmo", "jais", "trillion"}

# gguf token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """A GGUF file imprag_jax cannot read; the message says what and why."""


def _reader(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a core dependency
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from e


def _meta(reader) -> Dict[str, object]:
    """All metadata key/values as plain Python values (token lists included)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32(x) -> float:
    """GGUF stores floats as float32; print them back at float32 precision (9.99999974e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of a Q or K projection ([n_head*head_dim, d_in])."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute a [{rows}, ...] projection over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    a = dequantize(t.data, t.tensor_type)
    # numpy shape of a GGUF tensor is the reverse of its ggml shape: [out, in] for linears, [n] for norms
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    return np.asarray(a, np.float32).reshape(shape)


def config_from_gguf(meta: Dict[str, object], tied: bool, **overrides) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"imprag_jax reads Llama-architecture GGUF files; this one is {arch!r}")

    def need(key):
        if f"llama.{key}" not in meta:
            raise GGUFError(f"GGUF metadata has no llama.{key}")
        return meta[f"llama.{key}"]

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else meta.get("llama.vocab_size")
    if vocab is None:
        raise GGUFError("GGUF metadata has neither tokenizer.ggml.tokens nor llama.vocab_size")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"GGUF rope scaling {scaling!r} is not supported; import the HF directory instead")
    hf = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "tie_word_embeddings": tied,
    }
    return mapping.config_from_hf(hf, **overrides)


def _check_rope_freqs(factors: np.ndarray, cfg: ModelConfig):
    """A `rope_freqs.weight` tensor holds llama3-style per-frequency divisors; check them against the config."""
    from ..model.layers import rope_inv_freq

    if cfg.rope_scaling is None:
        raise GGUFError("this GGUF file carries rope frequency factors (rope_freqs.weight), i.e. llama3-style rope "
                        "scaling; pass rope_scaling={...} (the model's HF config values) to load_gguf")
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    ours = plain / rope_inv_freq(cfg)
    if factors.shape != ours.shape or not np.allclose(factors, ours, rtol=1e-3):
        raise GGUFError("rope_scaling does not reproduce the file's rope_freqs.weight factors")


def load_gguf(path: str, **overrides) -> Tuple[ModelConfig, dict, Tokenizer]:
    """(ModelConfig, fp32 numpy parameter tree, Tokenizer) from a Llama GGUF file.

    `overrides` go to the ModelConfig (e.g. b=..., t=..., dtype="bfloat16")."""
    reader = _reader(path)
    meta = _meta(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, tied="output.weight" not in tensors, **overrides)
    if "rope_freqs.weight" in tensors:
        _check_rope_freqs(_dequantize(tensors["rope_freqs.weight"]), cfg)
    get, has = hf_view(tensors, cfg)
    params = mapping.hf_to_params(get, cfg, has)
    return cfg, params, _tokenizer_from_meta(meta, path)


def hf_view(tensors: dict, cfg: ModelConfig) -> Tuple[Callable[[str], np.ndarray], Callable[[str], bool]]:
    """`get(hf_name)` / `has(hf_name)` over a GGUF file's tensors (dequantized, Q/K rows un-permuted)."""
    to_gguf = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        for g, hf in _LAYER_NAMES.items():
            to_gguf[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"
    unknown = set(tensors) - set(to_gguf.values()) - _IGNORED
    if unknown:
        raise GGUFError(f"GGUF file has tensors imprag_jax does not know: {sorted(unknown)[:8]}")

    def has(name: str) -> bool:
        return to_gguf.get(name) in tensors

    def get(name: str) -> np.ndarray:
        g = to_gguf.get(name)
        if g is None or g not in tensors:
            raise GGUFError(f"GGUF file has no tensor {g or name!r} (needed for {name})")
        w = _dequantize(tensors[g])
        if g.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif g.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        return w

    return get, has


# ---------------------------------------------------------------------------------------------------- tokenizer


def load_gguf_tokenizer(path: str, pre_tokenizer: str = "gguf") -> Tokenizer:
    """The byte-level BPE tokenizer stored in a GGUF file's metadata.

    pre_tokenizer: "gguf" splits text the way `tokenizer.ggml.pre` says (for SmolLM2's "smollm": every digit on its
    own, then the GPT-2 regex -- what llama.cpp and the original tokenizer do); "gpt2" uses the GPT-2 regex alone
    (what transformers' GGUF loader builds). The two differ only where a run of 2+ whitespace characters is
    followed by a digit.
    """
    return _tokenizer_from_meta(_meta(_reader(path)), path, pre_tokenizer)


def _pre_tokenizer(pre: Optional[str], mode: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if mode == "gpt2":
        return byte_level
    if mode != "gguf":
        raise ValueError(f"pre_tokenizer must be 'gguf' or 'gpt2', got {mode!r}")
    if pre is None or pre in _PRE_GPT2:
        return byte_level
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"GGUF tokenizer pre-type {pre!r} is not supported (known: "
                    f"{sorted(_PRE_GPT2 | _PRE_DIGITS_THEN_GPT2)}); pass pre_tokenizer='gpt2' to use the plain "
                    "GPT-2 split anyway")


def _tokenizer_from_meta(meta: Dict[str, object], path: str, pre_tokenizer: str = "gguf") -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (imprag_jax reads byte-level BPE, "
                        "tokenizer.ggml.model='gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: the token list has duplicates")
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), pre_tokenizer)
    tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == _CONTROL]
    user = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def _id(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    bos, eos, pad = _id("bos_token_id"), _id("eos_token_id"), _id("padding_token_id")
    return Tokenizer(tok, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else (eos or 0),
                     chat_template=meta.get("tokenizer.chat_template"))
