"""What `data.query_filler_split` costs per train step: the synthetic config's warmup step with and without E_q's own
prompt (`query_tokens` / `query_mask`, one more bottom-group pass over [B, L_query]).

    python benchmarks/query_split_step.py --json OUT.json            # synthetic shapes, L_query 40, 15 rounds
    python benchmarks/query_split_step.py --json OUT.json --quick    # CI: 2 rounds

The step is `imprag_jax.train.state.compile_step(..., "warmup")` at `configs/synthetic.py`'s shapes (hidden 128,
4 layers, b = 1, batch 32 x k 4, L_q 24 + L_r 4, l_max 24, 8 retrieval-free rows, score bias), random weights and
tokens, one state chained through every step. Variants, timed in ONE run, interleaved (default, split, default,
split, ...; the median over the rounds is reported):

  default  the step without the filler (`configs/synthetic.py:no_filler`: E_q from the reader's prompt)
  split    the same step with `query_tokens` [32, L_query] (the README job's step since the query filler became
           the synthetic default; the rows `query_filler_split*`)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCHEMA = "imprag_jax.bench.query_split_step/1"
VARIANTS = ("default", "split")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _batch(shapes, rng):
    b = {}
    for k, (shape, dtype) in shapes.items():
        if k.endswith("mask"):
            b[k] = np.ones(shape, dtype)
        elif k == "passage_ids":
            b[k] = rng.randint(0, 10_000, size=shape).astype(dtype)
        elif k == "positives":
            b[k] = np.zeros(shape, dtype)
            b[k][:, 0] = 1
        else:
            b[k] = rng.randint(1, 500, size=shape).astype(dtype)
    r = 4  # L_r: the loss on the response, the prompt before it
    b["loss_mask"][:, :-r] = 0
    b["prompt_mask"][:, -r:] = 0
    b["free_loss_mask"][:, :-r] = 0
    return b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="CI size: 2 rounds")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--L_query", type=int, default=40)
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. how loaded the machine was)")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from configs import synthetic
    from mined_step import time_interleaved
    from imprag_jax.train.setup import build
    from imprag_jax.train.state import compile_step, create_state

    c = synthetic.get_config("no_filler")  # the baseline: E_q from the reader's prompt
    c.model.vocab_size = 512
    c.mesh.data = 1
    s = build(c)
    rounds = 2 if args.quick else args.rounds
    B = s.shapes["tokens"][0][0]
    shapes = {"default": dict(s.shapes)}
    shapes["split"] = dict(s.shapes, query_tokens=((B, args.L_query), np.dtype(np.int32)),
                           query_mask=((B, args.L_query), np.dtype(np.int32)))
    rng = np.random.RandomState(0)
    batches = {}
    base = _batch(shapes["default"], rng)
    batches["default"] = {k: jnp.asarray(x) for k, x in base.items()}
    q = rng.randint(1, 500, size=(B, args.L_query)).astype(np.int32)
    batches["split"] = dict(batches["default"], query_tokens=jnp.asarray(q), query_mask=jnp.ones_like(jnp.asarray(q)))
    res = {"schema": SCHEMA, "quick": bool(args.quick), "rounds": rounds, "note": args.note, "L_query": args.L_query,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                       "backend": jax.default_backend(), "devices": jax.device_count(),
                       "loadavg_at_start": list(os.getloadavg())},
           "shapes": {v: {k: list(x[0]) for k, x in sh.items()} for v, sh in shapes.items()}, "variants": {}}
    compiled = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        compiled[v] = compile_step(s.cfg, s.sc, "warmup", s.tx, s.mesh, shapes[v])[0]
        res["variants"][v] = {"compile_s": time.perf_counter() - t0, "step_s_all": []}
        log(f"compiled {v} in {res['variants'][v]['compile_s']:.1f}s")
    state = create_state(s.cfg, s.tx, s.mesh, jax.random.key(0))

    def run_step(v, state):
        out = compiled[v](state, batches[v], jnp.float32(1.0))
        jax.block_until_ready(out)
        return out[0]

    time_interleaved(run_step, VARIANTS, rounds, state, res["variants"])
    res["split_over_default"] = res["variants"]["split"]["step_s"] / res["variants"]["default"]["step_s"]
    res["machine"]["loadavg_at_end"] = list(os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=float)
    log(" | ".join(f"{v} {res['variants'][v]['step_s'] * 1e3:.1f} ms" for v in VARIANTS)
        + f" | split / default {res['split_over_default']:.3f}")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
