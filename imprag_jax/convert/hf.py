"""Hugging Face Llama directories <-> imprag_jax.

    cfg, params, tokenizer = load_hf_dir("path/to/Llama-3.2-3B")          # config.json + *.safetensors
    save_hf_dir(params, cfg, tokenizer, "out/")                          # what LlamaForCausalLM loads

Weights are read with `safetensors` (numpy; bf16/fp16 tensors are widened to fp32), one file or shards listed
in `model.safetensors.index.json`. The tensor layout is translated by the table in `mapping`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..data.tokenizer import Tokenizer
from ..model.config import ModelConfig
from . import mapping

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


class HFDirError(ValueError):
    """A Hugging Face model directory imprag_jax cannot read; the message says what is wrong."""


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("reading/writing HF directories needs `safetensors` "
                          "(pip install safetensors, or pip install 'imprag_jax[torch]')") from e
    return safe_open


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise HFDirError(f"not a directory: {path}")
    cj = os.path.join(path, "config.json")
    if not os.path.isfile(cj):
        raise HFDirError(f"{path} has no config.json (expected a Hugging Face model directory)")
    with open(cj) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise HFDirError(f"{cj} is not valid JSON: {e}") from e
    mt = hf.get("model_type")
    if mt != "llama":
        raise HFDirError(f"{path}: model_type is {mt!r}; imprag_jax reads Llama-architecture models "
                         "(model_type 'llama')")
    return hf


def _weight_files(path: str) -> Dict[str, str]:
    """{tensor name: file} for a single-file or sharded checkpoint."""
    safe_open = _safetensors()
    idx = os.path.join(path, INDEX)
    if os.path.isfile(idx):
        with open(idx) as f:
            wm = json.load(f).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise HFDirError(f"{idx} has no weight_map")
        missing = sorted({v for v in wm.values() if not os.path.isfile(os.path.join(path, v))})
        if missing:
            raise HFDirError(f"{path}: shard files listed in {INDEX} are missing: {missing}")
        return {k: os.path.join(path, v) for k, v in wm.items()}
    files = [os.path.join(path, SINGLE)] if os.path.isfile(os.path.join(path, SINGLE)) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        extra = f" (found {bins}: PyTorch pickles are not read; convert them to safetensors)" if bins else ""
        raise HFDirError(f"{path} has no *.safetensors weights{extra}")
    out = {}
    for fn in files:
        with safe_open(fn, framework="np") as f:
            for k in f.keys():
                out[k] = fn
    return out


class _Shards:
    """Lazy tensor access over safetensors files, keeping each file open once."""

    def __init__(self, where: Dict[str, str]):
        self.where = where
        self._open = {}

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        fn = self.where.get(name)
        if fn is None:
            raise HFDirError(f"tensor {name!r} is in none of the checkpoint's safetensors files")
        if fn not in self._open:
            self._open[fn] = _safetensors()(fn, framework="np").__enter__()
        a = self._open[fn].get_tensor(name)
        return a.astype(np.float32) if a.dtype != np.float32 else a

    def close(self):
        for f in self._open.values():
            f.__exit__(None, None, None)
        self._open.clear()


def load_hf_params(path: str, cfg: ModelConfig) -> dict:
    shards = _Shards(_weight_files(path))
    try:
        return mapping.hf_to_params(shards.get, cfg, shards.has)
    except KeyError as e:
        raise HFDirError(f"{path}: {e.args[0]}") from e
    finally:
        shards.close()


def load_hf_dir(path: str, **overrides) -> Tuple[ModelConfig, dict, Optional[Tokenizer]]:
    """(ModelConfig, fp32 numpy parameter tree, Tokenizer or None when the dir has no tokenizer.json).

    `overrides` go to the ModelConfig (e.g. b=..., t=...)."""
    hf = read_hf_config(path)
    cfg = mapping.config_from_hf(hf, **overrides)
    params = load_hf_params(path, cfg)
    tok = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return cfg, params, tok


# ---------------------------------------------------------------------------------------------------- export


def _np_dtype(dtype: str):
    if dtype == "float32":
        return np.float32
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if dtype == "float16":
        return np.float16
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def _shard(tensors: Dict[str, np.ndarray], max_bytes: int):
    shards, cur, size = [], {}, 0
    for name, a in tensors.items():
        if cur and size + a.nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = a
        size += a.nbytes
    if cur:
        shards.append(cur)
    return shards


def save_tokenizer(tokenizer: Tokenizer, out: str):
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (what `Tokenizer.from_dir` and
    transformers' AutoTokenizer read)."""
    tokenizer.tok.save(os.path.join(out, "tokenizer.json"))
    name = lambda i: tokenizer.tok.id_to_token(i) if i is not None else None  # noqa: E731
    specials = {k: name(v) for k, v in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                                         ("pad_token", tokenizer.pad_id)) if v is not None}
    tc = dict(specials, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
              add_bos_token=False, add_eos_token=False, model_max_length=1 << 30)
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)


def save_hf_dir(params, cfg: ModelConfig, tokenizer: Optional[Tokenizer], out: str,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str = "float32") -> str:
    """Write a directory `transformers.LlamaForCausalLM.from_pretrained` loads: config.json,
    generation_config.json, model.safetensors (or shards + model.safetensors.index.json above max_shard_bytes),
    and the tokenizer files when `tokenizer` is given. Returns `out`."""
    _safetensors()
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    np_dt = _np_dtype(dtype)
    tensors = {k: np.ascontiguousarray(v.astype(np_dt)) for k, v in mapping.params_to_hf(params, cfg).items()}
    for fn in os.listdir(out):  # stale weights from an earlier export would be read back with these
        if fn.endswith(".safetensors") or fn == INDEX:
            os.remove(os.path.join(out, fn))
    shards = _shard(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, os.path.join(out, fn), metadata=meta)
            weight_map.update({k: fn for k in sh})
        total = sum(a.nbytes for a in tensors.values())
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for fn in os.listdir(out):  # safetensors writes owner-only files; an export is meant to be shared
        if fn.endswith(".safetensors"):
            os.chmod(os.path.join(out, fn), 0o644)
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        if tokenizer.extra_stop_ids:
            ids["eos_token_id"] = list(tokenizer.stop_ids)
        ids = {k: v for k, v in ids.items() if v is not None}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(mapping.hf_config_from_model(cfg, torch_dtype=dtype, **ids), f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(dict(ids, _from_model_config=True), f, indent=2)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out
