"""imprag_jax: query-free retrieval-augmented generation (ImpRAG) in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex",
    "ml-collections>=1.1.0",
    "numpy",
    "tqdm",
    "absl-py",
    "tokenizers",
    "gguf>=0.19.0",
    "tensorboardX",
]
EXTRAS = {
    "test": ["pytest", "pytest-xdist"],
    "torch": ["torch==2.13.0", "transformers>=5.0", "accelerate", "safetensors"],
    "scann": ["scann"],
    # the README's install (`.[data]`) covers the README's entry points: evaluate's report.png, export's weights
    "data": ["grain", "tensorflow-datasets", "array-record", "bm25s", "PyStemmer", "matplotlib", "safetensors"],
    "bench": ["faiss-cpu", "matplotlib"],
}
EXTRAS["all"] = sorted({d for v in EXTRAS.values() for d in v})

setup(
    name="imprag_jax",
    version="0.1.0",
    description="ImpRAG: one decoder LM as retriever and reader, in JAX/Flax",
    packages=find_packages(include=["imprag_jax", "imprag_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
