"""imprag_jax: ImpRAG (arXiv 2506.02279) in JAX/Flax."""
__version__ = "0.1.0"
