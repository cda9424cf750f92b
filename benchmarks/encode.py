"""Corpus-encoding benchmark: ImpRAG passage encoding (`imprag_jax.retrieval.encode_corpus`: the bottom group,
b layers + layer b's key projection of one token) vs a full-model forward of the same passages.

    python benchmarks/encode.py --json OUT.json                  # SmolLM2 shapes, 128 passages of 128 tokens
    python benchmarks/encode.py --json OUT.json --quick          # CI: tiny model

Measured in ONE run, interleaved round by round (median over the rounds), random weights and tokens, full
passages, the same fixed batch shape everywhere:

  encode_jit       the jitted `model.passage_embedding` per batch (what `encode_corpus` runs per batch)
  encode_corpus    `encode_corpus(...)` over the whole corpus (host copies, fixed-shape batches, the index build
                   not included: its `stats["seconds"]`), called once before the rounds to compile
  forward_hidden   the jitted full decoder over the same batches, final hidden states (N layers, no vocab head)
  forward_logits   the same plus the final norm and the [l, V] vocabulary projection (the "whole model")

Target: encode throughput >= 0.8 * N / (b + 1) x the full forward's (encoding runs b of the N layers plus one
projection of one token).  FLOPs per passage of l tokens: encode = b (l lin + C(l) att) + 2 d KV Dh,
forward = N (l lin + C(l) att) (+ l 2 d V with logits) -- the notation of benchmarks/train_step.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import train_step as ts  # noqa: E402  (the FLOP notation, model presets and device info live there)

SCHEMA = "imprag_jax.bench.encode/1"


def encode_flops(cfg, l: int) -> float:
    z = ts._dims(cfg)
    return cfg.b * (l * z["lin"] + ts._causal(l) * z["att"]) + 2.0 * z["d"] * z["D"]


def forward_flops(cfg, l: int, logits: bool) -> float:
    z = ts._dims(cfg)
    return cfg.num_layers * (l * z["lin"] + ts._causal(l) * z["att"]) + (l * z["head"] if logits else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--shape", default=None, help="tiny | smollm2 | llama3_1b | llama3_3b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--passages", type=int, default=None, help="corpus size")
    ap.add_argument("--l", type=int, default=None, help="passage length")
    ap.add_argument("--batch", type=int, default=None, help="passages per jitted call")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--no-logits", action="store_true", help="skip the forward_logits variant")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape = args.shape or "tiny"
        args.repeat = min(args.repeat, 2)
    args.shape = args.shape or "smollm2"
    small = args.shape == "tiny"
    n_pass = args.passages or (16 if small else 128)
    l = args.l or (8 if small else 128)
    bs = args.batch or (8 if small else 32)
    n_pass = -(-n_pass // bs) * bs

    import jax
    import jax.numpy as jnp

    from imprag_jax.model import forward, init_params, passage_embedding
    from imprag_jax.retrieval.encode import encode_corpus

    info = ts.device_info()
    cfg = ts.model_config(args.shape, dtype=args.dtype or ("float32" if info["backend"] == "cpu" else None))
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (n_pass, l), dtype=np.int32)
    mask = np.ones((n_pass, l), np.int32)
    batches = [(jnp.asarray(tokens[i:i + bs]), jnp.asarray(mask[i:i + bs])) for i in range(0, n_pass, bs)]
    ts.log(f"{args.shape}: {n_pass} passages x {l} tokens, batch {bs}, N = {cfg.num_layers}, b = {cfg.b}")

    enc = jax.jit(lambda p, t, m: passage_embedding(p, cfg, t, m)[0])
    fwd_h = jax.jit(lambda p, t, m: forward(p, cfg, t, m, return_hidden=True))
    fwd_l = jax.jit(lambda p, t, m: forward(p, cfg, t, m))

    def over_corpus(fn):
        def run():
            t = time.perf_counter()
            outs = [fn(params, a, b) for a, b in batches]
            jax.block_until_ready(outs)
            return time.perf_counter() - t
        return run

    def corpus_call():
        st = {}
        encode_corpus(params, cfg, tokens, mask, batch_size=bs, progress=False, stats=st)
        return st["seconds"]

    variants = {"encode_jit": over_corpus(enc), "encode_corpus": corpus_call,
                "forward_hidden": over_corpus(fwd_h)}
    if not args.no_logits:
        variants["forward_logits"] = over_corpus(fwd_l)
    first = {}
    for name, fn in variants.items():  # compile + warm up
        first[name] = fn()
        ts.log(f"  first call {name}: {first[name]:.2f}s")
    times = {name: [] for name in variants}
    for r in range(args.repeat):
        for name, fn in variants.items():
            times[name].append(fn())
        ts.log(f"  round {r + 1}/{args.repeat}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in variants))

    res = {}
    for name in variants:
        t = float(np.median(times[name]))
        fl = (encode_flops(cfg, l) if name.startswith("encode") else
              forward_flops(cfg, l, logits=name == "forward_logits")) * n_pass
        res[name] = {"seconds": t, "seconds_all": times[name], "first_call_s": first[name],
                     "passages_per_s": n_pass / t, "tokens_per_s": n_pass * l / t, "model_flops": fl,
                     "model_flops_per_s": fl / t}
    target = 0.8 * cfg.num_layers / (cfg.b + 1)
    ratios = {}
    for e in ("encode_jit", "encode_corpus"):
        for f in ("forward_hidden", "forward_logits"):
            if f in res:
                ratios[f"{e}_vs_{f}"] = {
                    "speedup": res[f]["seconds"] / res[e]["seconds"],
                    "flops_ratio": res[f]["model_flops"] / res[e]["model_flops"],
                    "per_round": [b / a for a, b in zip(times[e], times[f])]}
    main_ratio = ratios["encode_corpus_vs_forward_hidden"]["speedup"]
    out = {"schema": SCHEMA, "date": datetime.date.today().isoformat(),
           "argv": sys.argv[1:] if argv is None else argv, "machine": info, "quick": bool(args.quick),
           "shape": {"name": args.shape, "passages": n_pass, "l": l, "batch": bs, "N": cfg.num_layers,
                     "b": cfg.b, "dtype": cfg.dtype},
           "variants": res, "ratios": ratios,
           "target": {"min_speedup": target, "formula": "0.8 * N / (b + 1)", "measured": main_ratio,
                      "measured_is": "encode_corpus vs forward_hidden", "met": bool(main_ratio >= target)}}
    ts.log("")
    for name, r in res.items():
        ts.log(f"{name:<16}{r['seconds']:9.3f}s {r['passages_per_s']:9.1f} passages/s "
               f"{r['model_flops_per_s'] / 1e9:8.1f} GFLOP/s")
    for k, r in ratios.items():
        ts.log(f"{k:<40} {r['speedup']:.2f}x (FLOPs ratio {r['flops_ratio']:.2f}x)")
    ts.log(f"target >= {target:.2f}x: measured {main_ratio:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    ts.log(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
