"""Does the model read the gold passage, and in which layout? Teacher-forced answer NLL of SmolLM2-135M-Instruct and
of each run's latest checkpoint on dev questions with their gold passage, read three ways:

    closed book   no passage
    ImpRAG        the passage visible only in the middle group (layers b..t; the run's own b/t, else 7/21), the
                  prompt alone in the bottom and top groups: ImpRAG's reading layout
    in context    the passage before the prompt through every layer (b = 0, t = N-1): RA-IT's layout

    python experiments/layout_nll.py --data runs/experiments_smollm2/minikilt_full [RUN ...] [--tasks nq,squad,trex]

Printed per model and task: the mean answer NLL per token (the response tokens, end token included) and the share
of questions whose first answer token is the model's top-1 prediction, for each layout. A layout in which the
passage does not lower the NLL below the closed-book one is a layout the model does not read in; greedy decoding
then cannot profit from retrieval, however good.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def dev_batch(data_dir: str, task: str, tok, n: int, L_q: int = 48, L_r: int = 12, l_max: int = 128) -> dict:
    """n dev examples of `task` with their gold passage (k = 1), in the training pipeline's row layout."""
    from imprag_jax.data.pipeline import BatchConfig, TrainBatches

    bc = BatchConfig(batch_size=n, free_batch_size=0, L_q=L_q, L_r=L_r, l_max=l_max, k=1, tasks={task: 1.0},
                     split="dev", positives="gold", n_pos=1, negatives="random", n_neg=0, cf=0.0, add_bos=False)
    return TrainBatches(data_dir, tok, bc, prefetch=0).batch(0)


def layout_scores(params, cfg, b: dict, layout: str) -> tuple:
    """(mean answer NLL per token, first-answer-token top-1 rate) of batch `b` read in `layout`."""
    import jax.numpy as jnp

    from imprag_jax.model.transformer import read
    from imprag_jax.train.losses import generation_nll, token_logprobs

    toks, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])
    if layout == "closed_book":
        out = read(params, cfg, toks, mask)
    else:
        if layout == "in_context":
            cfg = cfg.replace(b=0, t=cfg.num_layers - 1, passage_attention="joint")
        elif cfg.b == 0:  # an RA-IT run: read it in ImpRAG's default split
            cfg = cfg.replace(b=7, t=21)
        out = read(params, cfg, toks, mask, jnp.asarray(b["passages"]), jnp.asarray(b["passage_mask"]),
                   query_mask=jnp.asarray(b["prompt_mask"]))
    lp = token_logprobs(out.logits[:, :-1], toks[:, 1:])
    valid = jnp.asarray(b["loss_mask"][:, 1:])
    total, count = generation_nll(lp, valid)
    first = np.argmax(b["loss_mask"], axis=1) - 1  # the last prompt position predicts the first answer token
    pred = np.asarray(jnp.argmax(out.logits, -1))[np.arange(len(first)), first]
    hit = pred == b["tokens"][np.arange(len(first)), first + 1]
    return float(total / count), float(hit.mean())


LAYOUTS = ("closed_book", "imprag", "in_context")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories (their latest checkpoint)")
    ap.add_argument("--data", required=True, help="a prepared mini-KILT folder")
    ap.add_argument("--tasks", default="nq,squad,trex")
    ap.add_argument("--n", type=int, default=48, help="dev questions per task")
    a = ap.parse_args(argv)
    if not os.path.exists(os.path.join(a.data, "stats.json")):
        print(f"layout_nll: {a.data} is not a prepared data folder (python -m imprag_jax.data.prepare)", file=sys.stderr)
        return 2
    missing = [wd for wd in a.runs if not os.path.isdir(os.path.join(wd, "checkpoints"))]
    if missing:
        print(f"layout_nll: no checkpoints in {', '.join(missing)} (give run directories)", file=sys.stderr)
        return 2
    import jax

    from imprag_jax.convert.fetch import resolve_model
    from imprag_jax.run import RunError, restore_params

    cfg0, p0, tok = resolve_model("smollm2")
    cfg0 = cfg0.replace(b=7, t=21, passage_attention="joint")
    batches = {t: dev_batch(a.data, t, tok, a.n) for t in a.tasks.split(",")}
    print("| model | task | " + " | ".join(f"{x} NLL | {x} first-token top-1" for x in LAYOUTS) + " |")
    print("|---|---|" + "---|---|" * len(LAYOUTS))
    models = [("SmolLM2-Instruct", lambda: (p0, cfg0))] + [
        (os.path.basename(os.path.normpath(wd)), lambda wd=wd: restore_params(wd)[::2]) for wd in a.runs]
    for name, load in models:
        try:
            params, cfg = load()
        except RunError as e:
            print(f"layout_nll: {e}", file=sys.stderr)
            return 2
        params = jax.tree.map(jax.numpy.asarray, params)
        for task, b in batches.items():
            cells = [layout_scores(params, cfg, b, x) for x in LAYOUTS]
            print(f"| {name} | {task} | " + " | ".join(f"{nll:.3f} | {hit:.2f}" for nll, hit in cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
