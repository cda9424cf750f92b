"""Inference: two-stage ImpRAG inference, the Retriever and per-task evaluation (`imprag`), retrieval-only recall
(`recall`), answer / retrieval metrics (`metrics`), precomputed passage K/V for independent-attention models
(`kv_store`). Decoding is `model.decode`; a trained run loaded for
inference is `run.session`.
See docs/inference.md."""
