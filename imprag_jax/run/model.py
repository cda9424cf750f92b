"""A run's model and tokenizer from its config: `load_model` (the initial weights of model.init) and
`tokenizer` (what the run trains and reads with, found without loading any weights)."""
from __future__ import annotations

import os
from typing import Optional

from .config import RunError, model_config


def tokenizer(c, data_dir: Optional[str]):
    """The run's tokenizer: the data folder's (model.init 'random': the synthetic world's word-level vocabulary),
    else the pretrained model's: the GGUF file's (smollm2, *.gguf) or the Hugging Face directory's tokenizer.json
    (a directory without one falls back to the data folder's). Only tokenizer files are read."""
    from ..data.pipeline import load_tokenizer

    init = str(c.model.init)
    if init == "random":
        return load_tokenizer(data_dir)
    if init == "smollm2" or init.endswith(".gguf"):
        from ..convert.fetch import smollm2_path
        from ..convert.gguf import load_gguf_tokenizer

        path = smollm2_path() if init == "smollm2" else init
        if path is None:
            raise RunError("the run was initialised from SmolLM2 but the GGUF file is not cached; run "
                           "`python -m imprag_jax.convert.fetch smollm2` to get its tokenizer")
        return load_gguf_tokenizer(path)
    if os.path.isfile(os.path.join(init, "tokenizer.json")):
        from ..data.tokenizer import Tokenizer

        return Tokenizer.from_dir(init)
    return load_tokenizer(data_dir)


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
