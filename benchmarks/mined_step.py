"""Mined-candidate train step: what the in-step search costs with each `train.index_backend`.

    python benchmarks/mined_step.py --json OUT.json                 # synthetic shapes, N = 1,560 and 50,000
    python benchmarks/mined_step.py --json OUT.json --quick         # CI: N = 600 only, 2 rounds

The step is `imprag_jax.train.state.compile_step(..., "warmup")` at the synthetic config's shapes
(`configs/synthetic.py:no_filler`: hidden 128, 4 layers, batch 32 x k 4, L_q 24 + L_r 4, l_max 24, score bias) with
train.candidates = "mixed" (2 negatives per row replaced by mined passages, a 64-passage skip list per row, so
each row searches the top m = 2 + 4 + 64 = 70).  The index is random Gaussian embeddings of the model's
retrieval dimension D = 64 (N rows, fp32, random passage tokens); random weights, one state chained through
every step.  Variants, all timed in ONE run, interleaved round by round (A, B, C, D, A, B, ...; the median over
the rounds is reported):

  none    train.candidates = "pseudo": no mining (the floor)
  exact   the device search, `lax.top_k` over all N scores
  binned  the device search, binned partial reduce (retrieval/search.py)
  scann   the host ScaNN searcher through `jax.pure_callback` (retrieval/scann_backend.py; below 20k rows its
          brute force, above a k-means tree + AH + exact reorder, `default_params`)

Also per corpus: the search alone (the same B = 32 queries, k = 70, jitted; ScaNN through the same callback),
recall@70 of binned / scann against exact on those queries, and the host ScaNN build time (paid at every index
refresh, beside the re-encoding of the corpus).
"""
from __future__ import annotations

import argparse
import dataclasses
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

SCHEMA = "imprag_jax.bench.mined_step/1"
VARIANTS = ("none", "exact", "binned", "scann")
MINED_EXCLUDE = 64
INDEX_NEGATIVES = 2


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import synthetic

    c = synthetic.get_config("no_filler")  # the step as measured before the query filler default
    c.model.vocab_size = 512
    c.mesh.data = 1
    return c


def _batch(shapes, n_index, rng):
    b = {}
    for k, (shape, dtype) in shapes.items():
        if k.endswith("mask"):
            b[k] = np.ones(shape, dtype)
        elif k in ("passage_ids", "mined_exclude"):
            b[k] = rng.randint(0, n_index, size=shape).astype(dtype)
        elif k == "positives":
            x = np.zeros(shape, dtype)
            x[:, 0] = 1
            b[k] = x
        else:
            b[k] = rng.randint(1, 500, size=shape).astype(dtype)
    b["loss_mask"][:, :-4] = 0
    b["prompt_mask"][:, -4:] = 0
    return b


def time_interleaved(run_step, variants, rounds: int, state, out: dict):
    """One warm-up step per variant, then `rounds` rounds of one timed step each (A, B, ..., A, B, ...), the state
    chained through all of them: fills out[v]["step_s_all"] and its median out[v]["step_s"]; returns the state."""
    for v in variants:
        state = run_step(v, state)
    for _ in range(rounds):
        for v in variants:
            t0 = time.perf_counter()
            state = run_step(v, state)
            out[v].setdefault("step_s_all", []).append(time.perf_counter() - t0)
    for v in variants:
        out[v]["step_s"] = float(np.median(out[v]["step_s_all"]))
    return state


def bench_corpus(n, c, s, rounds, rng, steps_cache):
    import jax
    import jax.numpy as jnp

    from imprag_jax.retrieval.index import padded_rows
    from imprag_jax.retrieval.scann_backend import build_searcher, publish, slot_search_in_graph, unpublish
    from imprag_jax.retrieval.search import recall_at_k, search
    from imprag_jax.retrieval.index import PassageIndex
    from imprag_jax.train.state import compile_step, create_state, index_specs

    D, l = s.cfg.retrieval_dim, c.data.l_max
    emb = rng.randn(n, D).astype(np.float32)
    pidx = PassageIndex.create(emb, step=1, mesh=s.mesh, dtype=jax.numpy.float32)
    t0 = time.perf_counter()
    searcher = build_searcher(pidx)
    build_s = time.perf_counter() - t0
    slot = f"bench:{n}"
    publish(slot, searcher)
    ia = index_specs(padded_rows(n, s.mesh), D, l, s.mesh, dtype=jnp.float32)
    tok = rng.randint(1, 500, size=(ia["tokens"].shape[0], l)).astype(np.int32)
    index = {"emb": pidx.embeddings, "tokens": jax.device_put(tok, ia["tokens"].sharding),
             "mask": jax.device_put(np.ones_like(tok), ia["mask"].sharding),
             "step": jax.device_put(np.int32(1), ia["step"].sharding)}
    shapes = dict(s.shapes)
    B = shapes["tokens"][0][0]
    shapes["mined_exclude"] = ((B, MINED_EXCLUDE), np.dtype(np.int32))
    k = c.data.k
    m = min(INDEX_NEGATIVES + k + MINED_EXCLUDE, n)
    batch = _batch(shapes, n, rng)
    res = {"n": n, "d": D, "m": m, "scann_params": searcher.params, "scann_build_s": build_s, "variants": {}}

    compiled = {}
    for v in VARIANTS:
        if v == "none":
            if "none" not in steps_cache:
                t0 = time.perf_counter()
                steps_cache["none"] = (compile_step(s.cfg, s.sc, "warmup", s.tx, s.mesh, shapes)[0],
                                       time.perf_counter() - t0)
            compiled[v], ct = steps_cache["none"]
        else:
            sc = dataclasses.replace(s.sc, candidates="mixed", n_replace=INDEX_NEGATIVES, n_index=n, index_backend=v,
                                     scann_slot=slot if v == "scann" else "")
            t0 = time.perf_counter()
            compiled[v] = compile_step(s.cfg, sc, "warmup", s.tx, s.mesh, shapes, index_abstract=ia)[0]
            ct = time.perf_counter() - t0
        res["variants"][v] = {"compile_s": ct, "step_s_all": []}
        log(f"  N={n}: compiled {v} in {ct:.1f}s")

    state = create_state(s.cfg, s.tx, s.mesh, jax.random.key(0))
    dev_batch = {k_: jnp.asarray(x) for k_, x in batch.items()}

    def run_step(v, state):
        fn = compiled[v]
        out = fn(state, dev_batch, jnp.float32(1.0), *(() if v == "none" else (index,)))
        jax.block_until_ready(out)
        return out[0]

    time_interleaved(run_step, VARIANTS, rounds, state, res["variants"])
    base = res["variants"]["exact"]["step_s"]
    res["ratios_vs_exact"] = {v: res["variants"][v]["step_s"] / base for v in VARIANTS}
    res["mining_overhead_s"] = {v: res["variants"][v]["step_s"] - res["variants"]["none"]["step_s"]
                                for v in VARIANTS if v != "none"}

    # the search alone, same queries, and the mining quality
    q = jnp.asarray(rng.randn(B, D).astype(np.float32))
    fns = {"exact": jax.jit(lambda q: search(index["emb"], q, m, "exact", n_valid=n)),
           "binned": jax.jit(lambda q: search(index["emb"], q, m, "binned", n_valid=n)),
           "scann": jax.jit(lambda q: slot_search_in_graph(slot, q, m, d=D))}
    ids = {v: np.asarray(jax.block_until_ready(f(q))[1]) for v, f in fns.items()}
    res["search_s_all"] = {v: [] for v in fns}
    for r in range(rounds * 3):
        for v, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q))
            res["search_s_all"][v].append(time.perf_counter() - t0)
    res["search_s"] = {v: float(np.median(x)) for v, x in res["search_s_all"].items()}
    res[f"recall@{m}_vs_exact"] = {v: recall_at_k(ids[v], ids["exact"]) for v in ("binned", "scann")}
    unpublish(slot)
    log(f"  N={n}: step " + ", ".join(f"{v} {res['variants'][v]['step_s'] * 1e3:.1f} ms" for v in VARIANTS)
        + "; search " + ", ".join(f"{v} {t * 1e3:.2f} ms" for v, t in res["search_s"].items())
        + f"; scann build {build_s:.2f}s; recall {res[f'recall@{m}_vs_exact']}")
    return res


def to_markdown(res) -> str:
    lines = ["| N | none | exact | binned | scann | scann / exact | search exact / binned / scann (ms) | "
             "recall@m binned / scann | ScaNN build (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["corpora"]:
        v = r["variants"]
        rec = r[f"recall@{r['m']}_vs_exact"]
        lines.append(f"| {r['n']:,} | " + " | ".join(f"{v[x]['step_s'] * 1e3:.1f} ms" for x in VARIANTS)
                     + f" | {r['ratios_vs_exact']['scann']:.2f} | "
                     + " / ".join(f"{r['search_s'][x] * 1e3:.2f}" for x in ("exact", "binned", "scann"))
                     + f" | {rec['binned']:.3f} / {rec['scann']:.3f} | {r['scann_build_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="CI size: N = 600, 2 rounds")
    ap.add_argument("--corpora", default="1560,50000", help="index sizes N (comma separated)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. how loaded the machine was)")
    args = ap.parse_args(argv)
    import jax

    from imprag_jax.train.setup import build

    corpora = [600] if args.quick else [int(x) for x in args.corpora.split(",") if x]
    rounds = 2 if args.quick else args.rounds
    c = _config()
    s = build(c)
    rng = np.random.RandomState(0)
    res = {"schema": SCHEMA, "quick": bool(args.quick), "rounds": rounds, "note": args.note,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                       "backend": jax.default_backend(), "devices": jax.device_count(),
                       "loadavg_at_start": list(os.getloadavg())},
           "shapes": {k: list(v[0]) for k, v in s.shapes.items()}, "corpora": []}
    cache = {}
    for n in corpora:
        res["corpora"].append(bench_corpus(n, c, s, rounds, rng, cache))
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    res["machine"]["loadavg_at_end"] = list(os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1, default=float)
    log(to_markdown(res))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
