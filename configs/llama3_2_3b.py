"""Llama-3.2-3B ImpRAG (paper: b = 7, t = 19, k = 10).
Args: a mesh (gpu8 | v5p-32 | v5p-64 | cpu8) and/or smoke; see configs/llama3.py."""
from configs.llama3 import llama3_config


def get_config(arg: str = ""):
    return llama3_config("3b", arg)
