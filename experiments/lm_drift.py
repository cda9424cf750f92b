"""How far has a run moved the language model? Plain next-token NLL (no retrieval, no passages in the prompt) of the
pretrained SmolLM2-135M-Instruct and of each run's latest checkpoint on the same knowledge-source passages.

    python experiments/lm_drift.py --data runs/experiments_smollm2/minikilt_full RUN [RUN ...]

A retrieval stage that trains the bottom group without the generation loss (`train.retrieval_steps`) changes what
every layer above it reads; this prints by how much, in nats per token, beside the pretrained model's NLL.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def sample_passages(data_dir: str, n: int, every: int = 997) -> list:
    """Every `every`-th passage of <data_dir>/passages.jsonl, up to n (a fixed, spread-out sample)."""
    path = os.path.join(data_dir, "passages.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: prepare the mini-KILT first (python -m imprag_jax.data.prepare)")
    texts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i % every == 0:
                texts.append(json.loads(line)["text"])
                if len(texts) >= n:
                    break
    return texts


def lm_nll(params, cfg, tok, texts: list, length: int = 96) -> float:
    """Mean next-token NLL over the first `length` tokens of each text (the plain LM: every layer, no retrieval)."""
    import jax.numpy as jnp

    from imprag_jax.model.transformer import forward
    from imprag_jax.train.losses import generation_nll, token_logprobs

    ids = [tok.encode(t)[:length] for t in texts]
    toks = np.array([x + [tok.pad_id] * (length - len(x)) for x in ids], np.int32)
    mask = np.array([[1] * len(x) + [0] * (length - len(x)) for x in ids], np.int32)
    logits = forward(params, cfg, jnp.asarray(toks), jnp.asarray(mask))
    total, count = generation_nll(token_logprobs(logits[:, :-1], jnp.asarray(toks[:, 1:])), jnp.asarray(mask[:, 1:]))
    return float(total / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories (their latest checkpoint)")
    ap.add_argument("--data", required=True, help="a prepared mini-KILT folder (its passages.jsonl)")
    ap.add_argument("--n", type=int, default=24, help="passages")
    ap.add_argument("--length", type=int, default=96, help="tokens per passage")
    a = ap.parse_args(argv)
    import jax

    from imprag_jax.convert.fetch import resolve_model
    from imprag_jax.run import RunError, restore_params

    try:  # user mistakes first, in one line, before the model is read
        texts = sample_passages(a.data, a.n)
        missing = [wd for wd in a.runs if not os.path.isdir(os.path.join(wd, "checkpoints"))]
        if missing:
            raise FileNotFoundError(f"no checkpoints in {', '.join(missing)} (give run directories)")
    except FileNotFoundError as e:
        print(f"lm_drift: {e}", file=sys.stderr)
        return 2
    cfg0, p0, tok = resolve_model("smollm2")
    print(f"pretrained SmolLM2-135M-Instruct: {lm_nll(p0, cfg0, tok, texts, a.length):.3f} nats/token "
          f"({len(texts)} passages x {a.length} tokens)", flush=True)
    for wd in a.runs:
        try:
            p, step, cfg = restore_params(wd)
        except RunError as e:
            print(f"lm_drift: {e}", file=sys.stderr)
            return 2
        print(f"{wd} (step {step}): {lm_nll(jax.tree.map(jax.numpy.asarray, p), cfg, tok, texts, a.length):.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
