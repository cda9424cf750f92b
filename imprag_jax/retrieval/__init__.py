"""Retrieval: the device passage index, in-graph search, corpus encoding, index refresh, and a host ScaNN backend.

    from imprag_jax.retrieval import PassageIndex, encode_corpus, search, IndexRefresher
    index = encode_corpus(params, cfg, tokens, mask, batch_size=64, mesh=mesh)
    scores, ids = search(index, E_q, k=10, backend="binned", query_fingerprint=embedding_fingerprint(cfg))

`imprag_jax.retrieval.scann_backend.ScannIndex` (needs `scann`) is imported on demand.  See docs/retrieval.md.
"""
from imprag_jax.retrieval.encode import encode_corpus
from imprag_jax.retrieval.index import PassageIndex, config_fingerprint, embedding_fingerprint
from imprag_jax.retrieval.refresh import IndexRefresher
from imprag_jax.retrieval.search import (BACKENDS, brute_force_numpy, default_num_bins, recall_at_k, score_all,
                                         search)

__all__ = [
    "BACKENDS", "IndexRefresher", "PassageIndex", "brute_force_numpy", "config_fingerprint", "default_num_bins",
    "embedding_fingerprint", "encode_corpus", "recall_at_k", "score_all", "search",
]
