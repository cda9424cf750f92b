"""Greedy decoding with a KV cache, for the plain LM and for ImpRAG (passage K/V read once, held in the cache).

`greedy_generate` left-pads a batch of prompts (lengths bucketed to limit recompilation), prefills the cache in one
call, then decodes inside one jitted `lax.while_loop` that stops early when every row has emitted a stop token.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..model.transformer import Cache, PassageKV, cached_step, init_cache


def _bucket(n: int, step: int = 16) -> int:
    return max(step, -(-n // step) * step)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None):
    L = length or _bucket(max(len(s) for s in seqs))
    toks = np.full((len(seqs), L), pad_id, np.int32)
    mask = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        s = list(s)[-L:]
        if s:
            toks[i, L - len(s):] = s
            mask[i, L - len(s):] = 1
    return toks, mask


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, cfg: ModelConfig, tokens, mask, stop_ids, pkv, prefix_bias, offset, max_new_tokens: int):
    B, L = tokens.shape
    cache = init_cache(cfg, B, L + max_new_tokens)
    cache = cache._replace(pkv=pkv)
    logits, cache = cached_step(params, cfg, tokens, mask, cache, prefix_bias, offset)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, cache, done, last = state
        logits, cache = cached_step(params, cfg, last[:, None], (~done).astype(jnp.int32)[:, None], cache,
                                    prefix_bias, offset)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = out.at[:, i].set(jnp.where(done, 0, nxt))
        done = done | jnp.isin(nxt, stop_ids)
        return i + 1, out, cache, done, nxt

    i, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done, first))
    return out, i


def greedy_generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, pkv: Optional[PassageKV] = None,
                    prefix_bias=None, offset: int = 0) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), cut after the first stop token (which is dropped).

    With `pkv` (the passages' middle-group K/V from `model.passage_kv`) the middle layers attend to the passages:
    ImpRAG's second inference stage; `offset` is then the prompt's position shift (k * l_max).
    """
    toks, mask = left_pad(prompts, pad_id)
    stops = jnp.asarray(list(stop_ids) if stop_ids else [-1], jnp.int32)
    out, _ = _generate(params, cfg, jnp.asarray(toks), jnp.asarray(mask), stops, pkv, prefix_bias,
                       jnp.int32(offset), max_new_tokens)
    out = np.asarray(out)
    res = []
    stop = set(int(s) for s in stop_ids)
    for row in out:
        seq = []
        for t in row:
            if int(t) in stop:
                break
            seq.append(int(t))
        res.append(seq)
    return res


def greedy_recompute(params, cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Reference decoding without a cache (the whole sequence re-run every step); for tests."""
    from ..model import forward

    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = forward(params, cfg, jnp.asarray([seq], jnp.int32))
        nxt = int(jnp.argmax(logits[0, -1]))
        if nxt in stop_ids:
            break
        out.append(nxt)
        seq.append(nxt)
    return out
