"""The Flax Llama decoder with ImpRAG layer groups."""
from .config import ConfigError, ModelConfig
from .decode import Cache, init_cache
from .transformer import (PassageKV, ReadOutput, forward, init_params, last_index,
                          param_logical_axes, param_shapes, passage_embedding, passage_kv, prompt_offset,
                          prompt_through, query_embedding, read, retrieval_embedding, run_bottom)

__all__ = [
    "ConfigError", "ModelConfig", "Cache", "PassageKV", "ReadOutput", "forward", "init_cache",
    "init_params", "last_index", "param_logical_axes", "param_shapes", "passage_embedding", "passage_kv",
    "prompt_offset", "prompt_through", "query_embedding", "read", "retrieval_embedding", "run_bottom",
]
