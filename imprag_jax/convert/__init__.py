"""Import and export: Hugging Face Llama directories, GGUF files, the SmolLM2 fetcher, the logit checker.

    from imprag_jax.convert import resolve_model
    cfg, params, tokenizer = resolve_model("smollm2")      # or a HF directory, or a .gguf file

`mapping` holds the one table that translates HF tensor names/layouts to imprag_jax parameters; `gguf` and `hf`
read files into it, `save_hf_dir` writes it back out. `logit_check` (needs torch + transformers) compares the
imported model's logits with transformers'. Names are imported lazily, so `python -m imprag_jax.convert.fetch`
runs without loading the rest.
"""
import importlib

_EXPORTS = {
    "FetchError": "fetch", "resolve_model": "fetch", "smollm2_path": "fetch",
    "GGUFError": "gguf", "load_gguf": "gguf", "load_gguf_tokenizer": "gguf",
    "HFDirError": "hf", "load_hf_dir": "hf", "save_hf_dir": "hf",
    "config_from_hf": "mapping", "hf_config_from_model": "mapping", "hf_to_params": "mapping",
    "params_to_hf": "mapping",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
