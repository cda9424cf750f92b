"""Llama-3.1-8B ImpRAG (paper: b = 7, t = 23, k = 10). Args: a mesh (gpu8 | v5p-32 | v5p-64 | cpu8) and/or smoke."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama3 import llama3_config  # noqa: E402


def get_config(arg: str = ""):
    return llama3_config("8b", arg)
