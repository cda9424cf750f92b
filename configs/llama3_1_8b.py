"""Llama-3.1-8B ImpRAG (paper: b = 7, t = 23, k = 10).
Args: a mesh (gpu8 | v5p-32 | v5p-64 | cpu8) and/or smoke; see configs/llama3.py."""
from configs.llama3 import llama3_config


def get_config(arg: str = ""):
    return llama3_config("8b", arg)
