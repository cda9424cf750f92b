"""Inference: two-stage ImpRAG inference, the Retriever and per-task evaluation (`imprag`), retrieval-only recall
(`recall`), answer / retrieval metrics (`metrics`). Decoding is `model.decode`; a trained run loaded for
inference is `run.session`.
See docs/inference.md."""
