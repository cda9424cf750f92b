"""A run's model and tokenizer from its config: `load_model` (the initial weights of model.init) and
`tokenizer` (what the run trains and reads with, found without loading any weights)."""
from __future__ import annotations

import os
from typing import Optional

from ..data import paths
from ..model import ConfigError
from .config import RunError, model_config


def tokenizer(c, data_dir: Optional[str]):
    """The run's tokenizer: for model.init 'random', model.tokenizer's when set (a pretrained model's tokenizer
    over random weights: real text at toy sizes) else the data folder's (the synthetic world's word-level
    vocabulary); for a pretrained init, the checkpoint's: the GGUF file's (smollm2, *.gguf) or the Hugging Face
    directory's tokenizer.json (a directory without one falls back to the data folder's). Only tokenizer files are
    read."""
    from ..data.pipeline import load_tokenizer

    init = str(c.model.init)
    named = str(c.model.get("tokenizer", "") or "")
    if named:
        if init != "random":
            raise ConfigError(f"model.tokenizer={named!r} is for a random init; model.init={init!r} brings its own "
                              "tokenizer: drop model.tokenizer")
        tok = _pretrained_tokenizer(named)
        if tok is None:
            raise ConfigError(f"model.tokenizer={named!r}: expected 'smollm2', a .gguf file or a directory with a "
                              "tokenizer.json")
        return tok
    if init == "random":
        return load_tokenizer(data_dir)
    return _pretrained_tokenizer(init) or load_tokenizer(data_dir)


def _pretrained_tokenizer(spec: str):
    """The tokenizer of 'smollm2' (the cached GGUF), a .gguf file or a directory with a tokenizer.json; None for
    anything else."""
    if spec == "smollm2" or spec.endswith(".gguf"):
        from ..convert.fetch import smollm2_path
        from ..convert.gguf import load_gguf_tokenizer

        path = smollm2_path() if spec == "smollm2" else spec
        if path is None:
            raise RunError("the run reads text with SmolLM2's tokenizer but the GGUF file is not cached; run "
                           "`python -m imprag_jax.convert.fetch smollm2` to get it")
        if not os.path.isfile(path):
            raise RunError(f"tokenizer file {path!r} does not exist")
        return load_gguf_tokenizer(path)
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):
        from ..data.tokenizer import Tokenizer

        return Tokenizer.from_dir(spec)
    if not paths.is_local(spec):  # a bucket directory: its tokenizer files, copied to a local cache first
        try:
            if paths.exists(paths.join(spec, "tokenizer.json")):
                from ..data.tokenizer import Tokenizer

                return Tokenizer.from_dir(paths.local_copy(spec, names=("tokenizer.json", "tokenizer_config.json")))
        except paths.StorageError as e:
            raise RunError(f"tokenizer directory {spec!r}: {e}") from None
    return None


def load_model(c, tokenizer_vocab: Optional[int]):
    """(ModelConfig, params or None, tokenizer or None) from config.model.init: 'random' (no weights; the
    vocabulary is the tokenizer's unless model.vocab_size says) or a pretrained model (smollm2, an HF directory,
    a .gguf file) whose architecture the ModelConfig takes, with the ImpRAG fields of the config."""
    init = c.model.init
    if init == "random":
        return model_config(c, tokenizer_vocab), None, None
    from ..convert.fetch import resolve_model

    base_cfg, params, tok = resolve_model(init)
    return model_config(c, base=base_cfg), params, tok
