"""Inference benchmark: ImpRAG two-stage inference vs RA-IT (the same passages in the context), SmolLM2-135M shapes.

    python benchmarks/inference.py --json OUT.json            # batch 1 and 4, 3 timed rounds, 16 new tokens
    python benchmarks/inference.py --quick --json OUT.json    # batch 1, 2 rounds, 8 new tokens (CI)

Both systems use the same random weights of the SmolLM2-135M shape (30 layers; ImpRAG b = 7, t = 21), the same
k passages of l_max tokens each (every token real, so both read exactly k * l_max passage tokens), the same prompts
and the same greedy decoding code (KV cache, only the last prefill position projected to the vocabulary, no stop
token so every query decodes exactly `--new` tokens). Per query:

  ImpRAG  stage 1: the prompt through the bottom group -> E_q -> exact top-k search over an index of `--corpus`
          random embeddings; then the k passages through bottom + middle (their K/V read once); stage 2: the
          prompt through middle (+ passage K/V) and top, then decoding.
  RA-IT   the plain decoder over [k passages ; prompt] (prefill through all 30 layers), then decoding. Its
          retrieval (BM25 or a separate dense retriever) is NOT timed, which favours RA-IT.

The two are alternated round by round (the order flips each round) so that load on a shared machine hits both
alike; each is warmed up (compiled) first. Reported: median latency per batch and per query, queries/s, and
the ratio ImpRAG / RA-IT (of the medians, and the median of the per-round ratios, which cancels load drift
between rounds; target <= 0.6), ImpRAG's stage breakdown and the FLOPs each system executes per query
(`executed_flops`: dense attention over every cached key, as the code runs it).

Stored-KV mode (`--stored raw[,f16,h2o,pq]`, paper App. C; `imprag_jax/infer/kv_store.py`): the model gets
`passage_attention="independent"` (what a store needs) and three kinds of system are timed, interleaved round by
round: RA-IT as above, ImpRAG recomputing the passages (`imprag`, independent attention) and ImpRAG loading the
retrieved passages' middle-group K/V from a store (`stored_<variant>`: stage 1 + search, `KVStore.load` (memmap
read, PQ decode, RoPE to the slot positions), stage 2 + decoding; the passages never run). The store is built
once, before timing, over `--store_passages` random passages (building one for the whole 20k-passage index of
random weights would take hours on a CPU and ~59 GB at fp32); the search runs over the full index as before and
the retrieved ids are mapped into the store (id mod store size), so every load reads k distinct stored passages.
The store's files sit in the page cache (a small store), so the load time excludes disk reads. `--k 1,5,10,20`
measures every k (one row per batch and k; `--plot PNG` draws latency per query against k).
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


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="batch 1, 2 rounds, 8 new tokens, 2k passages")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,4; quick: 1)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per system (default 3; quick: 2)")
    ap.add_argument("--k", default="10", help="passages read; comma-separated for a sweep (one row per k)")
    ap.add_argument("--stored", default=None, help="stored-KV mode: comma-separated store variants of raw (fp32), "
                    "f16, h2o (50%% of the tokens, fp32), pq (M = 16 one-byte codes per 64-dim head vector, codecs trained "
                    "on 2048 token vectors each)")
    ap.add_argument("--store_passages", type=int, default=64, help="passages in the store (stored-KV mode)")
    ap.add_argument("--store_dir", default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--plot", default=None, help="latency per query against k (PNG; with a --k sweep)")
    ap.add_argument("--l_max", type=int, default=128, help="tokens per passage (configs/smollm2.py)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=None, help="new tokens per query (default 16; quick: 8)")
    ap.add_argument("--corpus", type=int, default=None, help="passages in the index (default 20000; quick: 2000)")
    ap.add_argument("--b", type=int, default=7, help="ImpRAG layer b (configs/smollm2.py)")
    ap.add_argument("--t", type=int, default=21, help="ImpRAG layer t (configs/smollm2.py)")
    ap.add_argument("--machine", default="2-core CPU dev machine")
    ap.add_argument("--date", default="2026-11-26")
    args = ap.parse_args(argv)
    batches = [int(x) for x in (args.batch or ("1" if args.quick else "1,4")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    new = args.new or (8 if args.quick else 16)
    n_corpus = args.corpus or (2000 if args.quick else 20000)

    import jax
    import jax.numpy as jnp

    from imprag_jax.model.decode import _bucket, continue_and_decode, greedy_generate, stop_array
    from imprag_jax.infer.imprag import Retriever, encode, read_passages
    from imprag_jax.model import ModelConfig, init_params
    from imprag_jax.model.transformer import prompt_offset

    ks = [int(x) for x in str(args.k).split(",")]
    variants = [v for v in (args.stored or "").split(",") if v]
    bad = [v for v in variants if v not in STORE_VARIANTS]
    if bad:
        ap.error(f"unknown --stored variant(s) {bad}; choose from {', '.join(STORE_VARIANTS)}")
    cfg = ModelConfig.smollm2_135m(b=args.b, t=args.t)
    if variants:
        cfg = cfg.replace(passage_attention="independent")
    log(f"[bench] SmolLM2-135M shapes, random weights ({cfg.num_params() / 1e6:.0f}M params, {cfg.dtype}); "
        f"b={cfg.b}, t={cfg.t}; k={args.k}, l_max={args.l_max}, prompt={args.prompt}, new={new}, "
        f"corpus={n_corpus}; passages {cfg.passage_attention}; jax {jax.__version__} on {jax.devices()[0].platform}")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    V = cfg.vocab_size
    ptoks = rng.integers(3, V, (n_corpus, args.l_max)).astype(np.int32)
    pmask = np.ones_like(ptoks)
    emb = rng.standard_normal((n_corpus, cfg.retrieval_dim)).astype(np.float32)
    retriever = Retriever.from_embeddings(emb, ptoks, pmask)
    stops = ()
    stores, store_info = {}, {}
    if variants:
        import tempfile

        from imprag_jax.infer.kv_store import build_store, open_store

        sdir = args.store_dir or tempfile.mkdtemp(prefix="kv_bench_")
        for v in variants:
            d = os.path.join(sdir, v)
            try:  # a store left by an earlier run with --store_dir, from the same weights and passages
                stores[v] = open_store(d, params, cfg)
                man = stores[v].manifest
                assert man["n"] == args.store_passages and man["l_max"] == args.l_max
                log(f"[bench] reusing the {v} store in {d}")
            except (ValueError, AssertionError):
                log(f"[bench] building the {v} store of {args.store_passages} passages in {d} ...")
                man = build_store(params, cfg, ptoks[:args.store_passages], pmask[:args.store_passages], d,
                                  progress=False, log=log, **STORE_VARIANTS[v])
                stores[v] = open_store(d)
            store_info[v] = {key: man[key] for key in ("disk_bytes_per_passage", "kv_bytes_per_passage",
                                                       "build_seconds", "pq_train_seconds", "tokens", "codec", "h2o")}
            store_info[v]["build_seconds_per_passage"] = man["build_seconds"] / args.store_passages
            log(f"[bench]   {v}: {man['kv_bytes_per_passage'] / 2**20:.3f} MiB of K/V per passage, built in "
                f"{man['build_seconds']:.1f}s")

    def imprag(prompts, timing=None, store=None, k=10):
        t0 = time.perf_counter()
        enc = encode(params, cfg, prompts, pad_id=0, max_new_tokens=new)
        scores, ids = retriever.search(enc.e_q, k)
        t1 = time.perf_counter()
        if store is None:
            pt, pm = retriever.gather(ids)
            pkv = jax.block_until_ready(read_passages(params, cfg, jnp.asarray(pt), jnp.asarray(pm)))
        else:  # k distinct stored passages per row (ids mapped into the small store)
            sid = (ids[:, :1] + np.arange(k)[None]) % store.n
            pkv = jax.block_until_ready(store.load(sid, cfg))
        t2 = time.perf_counter()
        out, _ = continue_and_decode(params, cfg, enc.h_b, enc.mask, enc.cache, stop_array(stops), pkv, None,
                                     jnp.int32(prompt_offset(cfg, k, args.l_max)), new)
        out = np.asarray(out)
        t3 = time.perf_counter()
        if timing is not None:
            timing.append({"encode_and_search": t1 - t0, "read_passages": t2 - t1, "prompt_and_decode": t3 - t2})
        return out, ids

    def ra_it(prompts, ids):
        seqs = [list(ptoks[ids[i]].reshape(-1)) + list(p) for i, p in enumerate(prompts)]
        return greedy_generate(params, cfg, seqs, max_new_tokens=new, stop_ids=stops, pad_id=0)

    systems = ["imprag", "ra_it"] + [f"stored_{v}" for v in variants]

    def call(name, prompts, k, stages=None, ids=None):
        if name == "ra_it":
            return ra_it(prompts, ids)
        return imprag(prompts, stages, stores.get(name[len("stored_"):]) if name.startswith("stored_") else None, k)

    results = []
    for k in ks:
        for B in batches:
            prompts = [list(rng.integers(3, V, args.prompt)) for _ in range(B)]
            log(f"[bench] batch {B}, k {k}: compiling ...")
            comp = {}
            ids = None
            for name in systems:
                t = time.perf_counter()
                out = call(name, prompts, k, ids=ids)
                if name == "imprag":
                    ids = out[1]
                comp[name] = time.perf_counter() - t
            log("[bench]   first calls (with compilation): " + ", ".join(f"{n} {c:.1f}s" for n, c in comp.items()))
            times = {n: [] for n in systems}
            stages = {n: [] for n in systems if n != "ra_it"}
            for r in range(rounds):
                order = systems if r % 2 == 0 else systems[::-1]
                for name in order:
                    t = time.perf_counter()
                    call(name, prompts, k, stages.get(name), ids)
                    times[name].append(time.perf_counter() - t)
                log(f"[bench]   round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in systems))
            med = {n: float(np.median(v)) for n, v in times.items()}
            row = {"batch": B, "k": k, "rounds": rounds,
                   "imprag_s_per_batch": med["imprag"], "ra_it_s_per_batch": med["ra_it"],
                   "imprag_latency_s_per_query": med["imprag"] / B, "ra_it_latency_s_per_query": med["ra_it"] / B,
                   "imprag_queries_per_s": B / med["imprag"], "ra_it_queries_per_s": B / med["ra_it"],
                   "ratio_imprag_over_ra_it": med["imprag"] / med["ra_it"],
                   "ratio_paired_median": float(np.median(np.array(times["imprag"]) / np.array(times["ra_it"]))),
                   "imprag_stages_s": {key: float(np.median([s_[key] for s_ in stages["imprag"]]))
                                       for key in stages["imprag"][0]},
                   "all_times_s": times, "compile_first_call_s": comp,
                   "tokens_read": {"passages": k * args.l_max, "prompt": args.prompt, "new": new}}
            for name in systems:
                if not name.startswith("stored_"):
                    continue
                tm = np.array(times[name])
                row[name] = {"s_per_batch": med[name], "latency_s_per_query": med[name] / B,
                             "queries_per_s": B / med[name], "ratio_over_ra_it": med[name] / med["ra_it"],
                             "ratio_over_ra_it_paired": float(np.median(tm / np.array(times["ra_it"]))),
                             "ratio_over_imprag_paired": float(np.median(tm / np.array(times["imprag"]))),
                             "stages_s": {key: float(np.median([s_[key] for s_ in stages[name]]))
                                          for key in stages[name][0]}}
            row["executed_flops_per_query"] = executed_flops(cfg, k, args.l_max, _bucket(args.prompt), new)
            results.append(row)
            log(f"[bench] batch {B}, k {k}: ImpRAG {med['imprag']:.2f}s, RA-IT {med['ra_it']:.2f}s per batch -> "
                f"ratio {row['ratio_imprag_over_ra_it']:.2f}, paired by round {row['ratio_paired_median']:.2f} "
                "(target <= 0.6)" + "".join(f"; {n} {med[n]:.2f}s, {row[n]['ratio_over_ra_it_paired']:.2f}x RA-IT"
                                            for n in systems if n.startswith("stored_")))
    rep = {"benchmark": "inference", "machine": args.machine, "date": args.date,
           "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "device": str(jax.devices()[0]), "model": "SmolLM2-135M shapes, random weights, float32",
           "b": cfg.b, "t": cfg.t, "num_layers": cfg.num_layers, "k": ks, "l_max": args.l_max,
           "passage_attention": cfg.passage_attention, "stored": variants, "stores": store_info,
           "store_passages": args.store_passages if variants else None,
           "prompt_tokens": args.prompt, "new_tokens": new, "corpus": n_corpus, "quick": args.quick,
           "target_ratio": 0.6, "target_ratio_stored": 0.3, "results": results}
    print(table(rep))
    if variants:
        print(stored_table(rep))
    if args.plot:
        plot(rep, args.plot)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return rep


STORE_VARIANTS = {"raw": {}, "f16": {"dtype": "float16"}, "h2o": {"h2o": 0.5}, "pq": {"pq_m": 16, "pq_train": 2048}}


def stored_table(rep) -> str:
    vs = rep["stored"]
    lines = ["| batch | k | RA-IT s/query | ImpRAG (recompute) s/query | " + " | ".join(
        f"stored {v} s/query (x RA-IT; x recompute, paired)" for v in vs) + " |",
        "|---|---|---|---|" + "---|" * len(vs)]
    for r in rep["results"]:
        cells = [f"{r['stored_' + v]['latency_s_per_query']:.3f} ({r['stored_' + v]['ratio_over_ra_it_paired']:.2f}; "
                 f"{r['stored_' + v]['ratio_over_imprag_paired']:.2f})" for v in vs]
        lines.append(f"| {r['batch']} | {r['k']} | {r['ra_it_latency_s_per_query']:.3f} | "
                     f"{r['imprag_latency_s_per_query']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rep, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for B in sorted({r["batch"] for r in rep["results"]}):
        rows = sorted([r for r in rep["results"] if r["batch"] == B], key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["ra_it_latency_s_per_query"] for r in rows], "o-", label=f"RA-IT (B={B})")
        ax.plot(ks, [r["imprag_latency_s_per_query"] for r in rows], "s-", label=f"ImpRAG recompute (B={B})")
        for v in rep["stored"]:
            ax.plot(ks, [r["stored_" + v]["latency_s_per_query"] for r in rows], "^--", label=f"ImpRAG stored {v} (B={B})")
    ax.set_xlabel("k (passages of %d tokens)" % rep["l_max"])
    ax.set_ylabel("latency per query (s)")
    ax.set_title(f"SmolLM2-135M shapes, {rep['new_tokens']} new tokens, {rep['machine']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def executed_flops(cfg, k: int, l: int, P: int, new: int) -> dict:
    """FLOPs per query as the code executes them (2 per multiply-add; attention dense over every cached key,
    masked or not; the vocabulary projection at one position per step). P: prompt tokens (its padded length)."""
    d, H, KV, hd, ff, V = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, \
        cfg.vocab_size
    N, b, t = cfg.num_layers, cfg.b, cfg.t
    lin = 2 * (d * H * hd * 2 + 2 * d * KV * hd + 3 * d * ff)  # per token per layer: q, o, k, v, MLP
    kv = 2 * 2 * d * KV * hd  # per token: K and V projections only
    att = 2 * 2 * H * hd  # per (query, key) pair: QK^T and PV
    head = 2 * d * V
    T = k * l + P
    S = T + new  # RA-IT cache length
    ra = N * (T * lin + T * S * att) + head
    ra += (new - 1) * (N * (lin + S * att) + head)
    s = P + new  # ImpRAG's own cache length
    n_mid = t + 1 - b
    mid_pairs = k * l * l if cfg.passage_attention == "independent" else (k * l) ** 2  # each row alone / joint
    passages = b * (k * l * lin + k * l * l * att) + (n_mid - 1) * (k * l * lin + mid_pairs * att) + k * l * kv
    prompt = N * P * lin + N * P * s * att + n_mid * P * k * l * att + head
    decode = (new - 1) * (N * (lin + s * att) + n_mid * k * l * att + head)
    imp = passages + prompt + decode
    return {"imprag": float(imp), "ra_it": float(ra), "ratio": imp / ra,
            "imprag_passages": float(passages), "ra_it_prefill": float(N * (T * lin + T * S * att) + head)}


def table(rep) -> str:
    lines = ["| batch | k | ImpRAG s/query | RA-IT s/query | ImpRAG q/s | RA-IT q/s | ImpRAG / RA-IT (medians; paired "
             "by round) | executed-FLOPs ratio | ImpRAG stages (s/batch): encode+search / read passages / "
             "prompt+decode |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        s = r["imprag_stages_s"]
        lines.append(f"| {r['batch']} | {r.get('k', rep['k'])} | {r['imprag_latency_s_per_query']:.3f} | {r['ra_it_latency_s_per_query']:.3f} | "
                     f"{r['imprag_queries_per_s']:.2f} | {r['ra_it_queries_per_s']:.2f} | "
                     f"{r['ratio_imprag_over_ra_it']:.2f}; {r['ratio_paired_median']:.2f} | "
                     f"{r['executed_flops_per_query']['ratio']:.2f} | "
                     f"{s['encode_and_search']:.3f} / {s['read_passages']:.3f} / "
                     f"{s['prompt_and_decode']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
