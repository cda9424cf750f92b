"""Test oracles: slow, obviously correct references the library's fast paths are compared against."""
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imprag_jax.model import ModelConfig, forward, read
from imprag_jax.model.decode import _bucket


@partial(jax.jit, static_argnames=("cfg",))
def _reference_logits(params, cfg: ModelConfig, tokens, mask, passages, passage_mask, prefix_bias):
    if passages is None:
        return forward(params, cfg, tokens, mask)
    return read(params, cfg, tokens, mask, passages, passage_mask, prefix_bias=prefix_bias).logits


def greedy_recompute(params, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, stop_ids=(),
                     passages=None, passage_mask=None, prefix_bias=None) -> list[int]:
    """Reference decoding without a cache: the whole sequence is re-read every step (with `passages` [1, k, L]
    through `model.read`, the train-time reader). The sequence is right-padded to a fixed length (a multiple of
    32) so that one compilation serves every step (causal attention: the padding after the last token changes
    nothing)."""
    L = _bucket(len(prompt) + max_new_tokens, 32)
    toks = np.zeros((1, L), np.int32)
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        n = len(seq)
        toks[0, :n] = seq
        mask = (np.arange(L) < n).astype(np.int32)[None]
        logits = _reference_logits(params, cfg, jnp.asarray(toks), jnp.asarray(mask), passages, passage_mask,
                                   prefix_bias)
        nxt = int(jnp.argmax(logits[0, n - 1]))
        if nxt in stop_ids:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def mining_case(n_passages: int, dim: int = 4, length: int = 3, queries: int = 2, seed: int = 0):
    """A small corpus for tests of candidate mining: (passage embeddings [N, D], query embeddings [Q, D], each
    query's passages best first [Q, N], passage tokens [N, length] (row i holds i*length..))."""
    rng = np.random.RandomState(seed)
    emb = rng.randn(n_passages, dim).astype(np.float32)
    e_q = rng.randn(queries, dim).astype(np.float32)
    order = np.argsort(-(e_q @ emb.T), axis=1)
    toks = np.arange(n_passages * length, dtype=np.int32).reshape(n_passages, length)
    return emb, e_q, order, toks

