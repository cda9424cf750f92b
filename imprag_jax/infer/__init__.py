"""Inference: greedy decoding with a KV cache (`generate`), two-stage ImpRAG inference, the Retriever and per-task
evaluation (`imprag`), answer / retrieval metrics (`metrics`), a trained run loaded for inference (`session`).
See docs/inference.md."""
