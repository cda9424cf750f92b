"""Retrieval benchmark: JAX exact / binned / approx search, ScaNN, FAISS (flat, IVF), numpy and BM25.

    python benchmarks/retrieval.py --json OUT.json                 # N in {10k, 100k, 1M} x D in {192, 1024}
    python benchmarks/retrieval.py --quick --json OUT.json         # N = 10k only, small real pool (CI)

Synthetic part: random Gaussian embeddings (fp32 on the host), the same queries for every method, queries/s and
recall@10 against numpy brute force; for the JAX search also the matmul-only time (`score_all`) and the ratio
`binned / matmul-only`.

Real part (needs the shared data folder and the SmolLM2 GGUF; skipped otherwise): the UNTRAINED SmolLM2-135M
ImpRAG embeddings (b = 7) of the real passage pool (`imprag_jax.retrieval.pool`), pre- and post-RoPE:
  * gold recall@1/5/10 of NQ-open / SQuAD questions beside BM25 (bm25s) -- the baseline training must beat;
  * a larger real corpus for the speed/recall comparison: the layer-b key state of every `stride`-th token of
    every passage (each is exactly the E_p of that passage prefix, so a prefix corpus of ~N*l/stride real
    embeddings comes from the same bottom-group pass), searched with the questions' E_q.
The embeddings are cached under `--cache` (default $IMPRAG_CACHE/bench or ~/.cache/imprag_jax/bench).

Timings: a method is warmed up once, then timed `--repeat` times; queries/s uses the median.  The numpy speed
depends on OPENBLAS_* environment variables; the JSON records them.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
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


def timed(fn, repeat: int = 3, warmup: int = 1):
    """(median seconds per call, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def recall(ids, ref) -> float:
    from imprag_jax.retrieval.search import recall_at_k

    return recall_at_k(np.asarray(ids), np.asarray(ref))


# ------------------------------------------------------------------------------------------------ the methods
def numpy_exact(db, q, k, block=64):
    out_s, out_i = [], []
    for s in range(0, q.shape[0], block):
        sc = q[s:s + block] @ db.T
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sc, part, axis=1)
        o = np.argsort(-ps, axis=1)
        out_i.append(np.take_along_axis(part, o, axis=1))
        out_s.append(np.take_along_axis(ps, o, axis=1))
    return np.concatenate(out_s), np.concatenate(out_i)


def bench_numpy(db, q, k, repeat):
    t, (s, i) = timed(lambda: numpy_exact(db, q, k), repeat)
    return {"qps": q.shape[0] / t, "seconds": t}, i


def bench_jax(db, q, k, ref, repeat, dtype="float32", backends=("exact", "binned", "approx")):
    import jax
    import jax.numpy as jnp

    from imprag_jax.retrieval.index import PassageIndex
    from imprag_jax.retrieval.search import default_num_bins, pick_bins, score_all, search

    mesh = jax.make_mesh((1,), ("index",), devices=jax.devices()[:1])
    index = PassageIndex.create(db, mesh=mesh, dtype=jnp.dtype(dtype))
    qj = jnp.asarray(q)
    out = {}
    mm = jax.jit(lambda ix, e: score_all(ix, e))
    t_mm, _ = timed(lambda: mm(index, qj).block_until_ready(), repeat)
    out["matmul_only"] = {"qps": q.shape[0] / t_mm, "seconds": t_mm}
    for b in backends:
        fn = jax.jit(lambda ix, e, b=b: search(ix, e, k, backend=b))
        t, (s, i) = timed(lambda: jax.block_until_ready(fn(index, qj)), repeat)
        row = {"qps": q.shape[0] / t, "seconds": t, "recall@10": recall(i, ref),
               "vs_matmul_only": t / t_mm}
        if b == "binned":
            row["num_bins"] = pick_bins(index.num_padded, default_num_bins(index.num_padded, k))
        out[b] = row
    index = None  # free the device copy before the next method
    return out


def bench_faiss(db, q, k, ref, repeat):
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss-cpu not installed (pip install 'imprag_jax[bench]')"}
    out = {}
    n, d = db.shape
    flat = faiss.IndexFlatIP(d)
    flat.add(db)
    t, (s, i) = timed(lambda: flat.search(q, k), repeat)
    out["flat"] = {"qps": q.shape[0] / t, "seconds": t, "recall@10": recall(i, ref)}
    flat = None
    gc.collect()
    nlist = int(max(1, round(math.sqrt(n))))
    nprobe = int(max(1, math.ceil(nlist / 10)))
    quant = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    train = db[np.sort(rng.choice(n, size=min(n, 50 * nlist), replace=False))]
    t0 = time.perf_counter()
    ivf.train(train)
    ivf.add(db)
    build = time.perf_counter() - t0
    ivf.nprobe = nprobe
    t, (s, i) = timed(lambda: ivf.search(q, k), repeat)
    out["ivf"] = {"qps": q.shape[0] / t, "seconds": t, "recall@10": recall(i, ref), "nlist": nlist,
                  "nprobe": nprobe, "build_seconds": build}
    ivf = quant = None
    gc.collect()
    return out


def bench_scann(db, q, k, ref, repeat):
    from imprag_jax.retrieval.scann_backend import ScannIndex, scann_available

    if not scann_available():
        return {"skipped": "scann not installed (pip install 'imprag_jax[scann]')"}
    t0 = time.perf_counter()
    idx = ScannIndex.build(db, k=k)
    build = time.perf_counter() - t0
    t, (s, i) = timed(lambda: idx.search(q, k), repeat)
    out = {"qps": q.shape[0] / t, "seconds": t, "recall@10": recall(i, ref), "build_seconds": build,
           "params": idx.params}
    idx = None
    gc.collect()
    return out


def compare_all(db, q, k, repeat, label, jax_dtype="float32"):
    log(f"[{label}] N={db.shape[0]} D={db.shape[1]} Q={q.shape[0]}")
    row = {"label": label, "N": int(db.shape[0]), "D": int(db.shape[1]), "Q": int(q.shape[0]), "k": k}
    row["numpy"], ref = bench_numpy(db, q, k, repeat)
    row["numpy"]["recall@10"] = 1.0
    log(f"  numpy {row['numpy']['qps']:.0f} q/s")
    row["jax"] = bench_jax(db, q, k, ref, repeat, dtype=jax_dtype)
    row["jax"]["dtype"] = jax_dtype
    row["binned_over_matmul_only"] = row["jax"]["binned"]["vs_matmul_only"]
    log("  jax " + ", ".join(f"{b} {v['qps']:.0f} q/s" for b, v in row["jax"].items() if isinstance(v, dict)))
    gc.collect()
    row["faiss"] = bench_faiss(db, q, k, ref, repeat)
    log(f"  faiss {row['faiss']}")
    row["scann"] = bench_scann(db, q, k, ref, repeat)
    if "qps" in row["scann"]:
        row["scann"]["speedup_vs_numpy"] = row["scann"]["qps"] / row["numpy"]["qps"]
        log(f"  scann {row['scann']['qps']:.0f} q/s recall {row['scann']['recall@10']:.3f}")
    gc.collect()
    return row


def random_db(n, d, seed, chunk=1 << 16):
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        out[s:s + chunk] = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
    return out


# ------------------------------------------------------------------------------------------- real embeddings
def real_embeddings(cache_dir, *, gguf, pool_kwargs, l_max, l_q, stride, batch_size, b=7):
    """E_p (pre/post RoPE), prefix E_p (pre), E_q (pre/post) of the pool under untrained SmolLM2; cached."""
    import jax
    import jax.numpy as jnp

    from imprag_jax.convert.gguf import load_gguf
    from imprag_jax.model import passage_embedding, query_embedding
    from imprag_jax.retrieval.pool import bottom_key_states, load_eval_pool, tokenize

    key = hashlib.sha256(json.dumps([os.path.getsize(gguf), pool_kwargs, l_max, l_q, stride, b],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"smollm2_pool_{key}.npz")
    pool = load_eval_pool(**pool_kwargs)
    if os.path.exists(path):
        log(f"real embeddings from {path}")
        return dict(np.load(path)), pool
    cfg, params, tok = load_gguf(gguf, b=b, t=max(b, 19))
    ptok, pmask = tokenize(tok, pool.passage_texts(), l_max, pad_id=tok.pad_id)
    qtok, qmask = tokenize(tok, pool.prompts(), l_q, pad_id=tok.pad_id, keep="right")
    t0 = time.perf_counter()
    ks = bottom_key_states(params, cfg, ptok, pmask, stride=stride, batch_size=batch_size, progress=True)
    p_secs = time.perf_counter() - t0
    p_pre, p_post, prefix = ks["last_pre"], ks["last_post"], ks["prefix_pre"]
    # the extraction agrees with the library's passage_embedding
    for c, got in ((cfg, p_pre), (cfg.replace(retrieval_rope="post"), p_post)):
        ref, _ = passage_embedding(params, c, jnp.asarray(ptok[:4]), jnp.asarray(pmask[:4]))
        np.testing.assert_allclose(got[:4], np.asarray(ref), rtol=1e-3, atol=1e-3)
    t0 = time.perf_counter()
    q_pre, q_post = [], []
    qfn = {m: jax.jit(lambda p, t, mk, c=cfg.replace(retrieval_rope=m): query_embedding(p, c, t, mk))
           for m in ("pre", "post")}
    for s in range(0, len(qtok), 256):
        t, m = qtok[s:s + 256], qmask[s:s + 256]
        r = len(t)
        if r < 256:
            t = np.concatenate([t, np.repeat(t[:1], 256 - r, 0)])
            m = np.concatenate([m, np.repeat(m[:1], 256 - r, 0)])
        q_pre.append(np.asarray(qfn["pre"](params, jnp.asarray(t), jnp.asarray(m)))[:r])
        q_post.append(np.asarray(qfn["post"](params, jnp.asarray(t), jnp.asarray(m)))[:r])
    q_pre, q_post = np.concatenate(q_pre), np.concatenate(q_post)
    q_secs = time.perf_counter() - t0
    out = {"p_pre": p_pre, "p_post": p_post, "prefix_pre": prefix.astype(np.float32), "q_pre": q_pre,
           "q_post": q_post, "gold": pool.gold(), "passage_tokens": pmask.sum(1),
           "encode_passages_per_s": np.float64(len(ptok) / p_secs), "encode_seconds": np.float64(p_secs),
           "query_seconds": np.float64(q_secs)}
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, **out)
    log(f"real embeddings cached at {path}")
    return out, pool


def gold_recall(real, pool, ks=(1, 5, 10)):
    from imprag_jax.retrieval.pool import bm25_search, recall_at_ks
    from imprag_jax.retrieval.search import brute_force_numpy

    srcs = np.array([q["source"] for q in pool.questions])
    gold = np.asarray(real["gold"])
    res = {}
    K = max(ks)
    t0 = time.perf_counter()
    bm = bm25_search(pool.passage_texts(), pool.prompts(), K)
    bm_secs = time.perf_counter() - t0
    ranked = {"imprag_untrained_pre_rope": brute_force_numpy(real["p_pre"], real["q_pre"], K)[1],
              "imprag_untrained_post_rope": brute_force_numpy(real["p_post"], real["q_post"], K)[1],
              "bm25": bm}
    for name, r in ranked.items():
        res[name] = {"all": recall_at_ks(r, gold, ks)}
        for s in sorted(set(srcs)):
            res[name][s] = recall_at_ks(r[srcs == s], gold[srcs == s], ks)
    counts = {s: int((srcs == s).sum()) for s in sorted(set(srcs))}
    return {"recall": res, "questions": counts, "passages": len(pool),
            "bm25_index_and_search_seconds": bm_secs}


def bench_bm25(pool, repeat):
    import bm25s

    try:
        import Stemmer

        stem = Stemmer.Stemmer("english")
    except ImportError:
        stem = None
    texts, qs = pool.passage_texts(), pool.prompts()
    t0 = time.perf_counter()
    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", stemmer=stem, show_progress=False), show_progress=False)
    build = time.perf_counter() - t0

    def run():
        q = bm25s.tokenize(qs, stopwords="en", stemmer=stem, return_ids=False, show_progress=False)
        return r.retrieve(q, k=10, show_progress=False)

    t, _ = timed(run, repeat)
    return {"qps": len(qs) / t, "seconds": t, "Q": len(qs), "N": len(texts), "index_seconds": build}


# ------------------------------------------------------------------------------------------------ markdown
def _fmt_row(r):
    def cell(x):
        if not isinstance(x, dict) or "qps" not in x:
            return "—"
        rec = x.get("recall@10")
        return f"{x['qps']:,.0f}" + (f" ({rec:.3f})" if rec is not None else "")

    j, f = r["jax"], r.get("faiss", {})
    return (f"| {r['label']} | {r['N']:,} | {r['D']} | {r['Q']} | {cell(r['numpy'])} | {cell(j['matmul_only'])} | "
            f"{cell(j['exact'])} | {cell(j['binned'])} | {cell(j['approx'])} | {j['binned']['vs_matmul_only']:.2f} | "
            f"{cell(f.get('flat'))} | {cell(f.get('ivf'))} | {cell(r.get('scann'))} |")


def to_markdown(res) -> str:
    """The speed/recall table(s) and the gold-recall table of a result JSON."""
    head = ("| corpus | N | D | Q | numpy exact | JAX matmul only | JAX exact | JAX binned | JAX approx | "
            "binned / matmul | FAISS flat | FAISS IVF | ScaNN |\n" + "|---" * 13 + "|")
    rows = [_fmt_row(r) for r in res.get("synthetic", [])]
    real = res.get("real") or {}
    for key in ("prefix_corpus_heldout_Ep_queries", "prefix_corpus_question_Eq_queries",
                "passage_corpus_question_Eq_queries"):
        if key in real:
            rows.append(_fmt_row(real[key]))
    out = ["Queries/s (recall@10 against numpy exact in brackets).", "", head] + rows
    if "gold_recall" in real:
        g = real["gold_recall"]
        out += ["", f"Gold-passage recall@1/5/10 over the real pool ({g['passages']:,} passages; questions: "
                    + ", ".join(f"{k} {v:,}" for k, v in g["questions"].items()) + ")", "",
                "| retriever | all @1 / @5 / @10 | " + " | ".join(f"{s} @1 / @5 / @10" for s in g["questions"])
                + " |", "|---" * (2 + len(g["questions"])) + "|"]
        for name, rec in g["recall"].items():
            cells = [" / ".join(f"{rec[s][k]:.3f}" for k in ("1", "5", "10") if k in rec[s]) if isinstance(
                next(iter(rec[s])), str) else " / ".join(f"{rec[s][k]:.3f}" for k in (1, 5, 10))
                for s in ["all"] + list(g["questions"])]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    if "bm25_speed" in real:
        b = real["bm25_speed"]
        out += ["", f"BM25 (bm25s): {b['qps']:,.0f} queries/s over {b['N']:,} passages ({b['Q']:,} questions), "
                    f"index built in {b['index_seconds']:.2f} s."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10k only and a small real pool (CI)")
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 10000,100000,1000000)")
    ap.add_argument("--dims", default="192,1024")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jax-dtype", default="float32",
                    help="index dtype for the JAX rows (bf16 matmuls are ~6x slower than fp32 on CPU XLA)")
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: imprag_jax.convert.fetch.smollm2_path())")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--l-max", type=int, default=128)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--real-queries", type=int, default=1024, help="questions used in the real speed comparison")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    ap.add_argument("--from-json", default=None, help="only render --markdown from an earlier result JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            md = to_markdown(json.load(f))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(md + "\n")
        print(md)
        return None

    import jax

    sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000,1000000")).split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    res = {
        "command": " ".join(["python", "benchmarks/retrieval.py"] + list(sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "jax_backend": jax.default_backend(), "loadavg_at_start": list(os.getloadavg()),
                    "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}},
        "synthetic": [], "real": None,
    }

    def dump():
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)

    if not args.skip_synthetic:
        for n in sizes:
            for d in dims:
                db = random_db(n, d, seed=n + d)
                q = random_db(args.queries, d, seed=1)
                rep = args.repeat if n < 1_000_000 else max(1, args.repeat - 1)
                res["synthetic"].append(compare_all(db, q, args.k, rep, f"random N={n} D={d}",
                                                    jax_dtype=args.jax_dtype))
                del db
                gc.collect()
                dump()

    if not args.skip_real:
        res["real"] = run_real(args)
    res["machine"]["loadavg_at_end"] = list(os.getloadavg())
    dump()
    log(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(res) + "\n")
    return res


def run_real(args):
    from imprag_jax.retrieval.pool import shared_data_dir

    gguf = args.gguf
    if gguf is None:
        try:
            from imprag_jax.convert.fetch import smollm2_path

            gguf = smollm2_path()
        except ImportError:
            gguf = None
    if gguf is None or not os.path.exists(gguf):
        return {"skipped": "SmolLM2 GGUF not found (python -m imprag_jax.convert.fetch smollm2)"}
    if shared_data_dir() is None:
        return {"skipped": "shared data folder not found (../shared/data or $IMPRAG_SHARED_DATA)"}
    cache = args.cache or os.path.join(os.environ.get("IMPRAG_CACHE") or
                                       os.path.join(os.path.expanduser("~"), ".cache", "imprag_jax"), "bench")
    if args.quick:
        pool_kwargs = dict(max_distractors=100, max_nq=100, max_squad_paragraphs=100)
        l_max = min(args.l_max, 64)
    else:
        pool_kwargs = dict(max_distractors=None, max_nq=None, max_squad_paragraphs=None)
        l_max = args.l_max
    real, pool = real_embeddings(cache, gguf=gguf, pool_kwargs=pool_kwargs, l_max=l_max, l_q=48,
                                 stride=args.stride, batch_size=16)
    out = {"pool": {"passages": len(pool), "questions": len(pool.questions), "l_max": l_max,
                    "mean_passage_tokens": float(np.mean(real["passage_tokens"])),
                    "encode_passages_per_s": float(real["encode_passages_per_s"])}}
    out["gold_recall"] = gold_recall(real, pool)
    out["bm25_speed"] = bench_bm25(pool, args.repeat)
    # the prefix corpus (one row per `stride` tokens of every passage) without a held-out set of passages,
    # whose E_p serve as queries: the untrained question E_q all point one way (cosine ~0.98 to their mean;
    # every question wants the same few hub rows), so they are reported too but are no test of an ANN index
    n_pass = len(real["p_pre"])
    owner = np.repeat(np.arange(n_pass), np.asarray(real["passage_tokens"]) // args.stride)
    assert len(owner) == len(real["prefix_pre"])
    rng = np.random.default_rng(0)
    held = rng.choice(n_pass, min(args.real_queries, n_pass // 5), replace=False)
    db = np.ascontiguousarray(real["prefix_pre"][~np.isin(owner, held)]).astype(np.float32)
    q_ep = np.ascontiguousarray(real["p_pre"][held]).astype(np.float32)
    q_eq = np.ascontiguousarray(real["q_pre"][: args.real_queries]).astype(np.float32)
    stats = lambda x: {"mean_norm": float(np.linalg.norm(x, axis=1).mean()),
                       "mean_cosine_to_mean": float(np.mean(x @ x.mean(0) / np.linalg.norm(x, axis=1)
                                                            / np.linalg.norm(x.mean(0))))}
    out["embedding_stats"] = {"E_q_questions": stats(q_eq), "E_p_passages": stats(real["p_pre"])}
    label = f"real SmolLM2 passage-prefix E_p (pre-RoPE, stride {args.stride})"
    out["prefix_corpus_heldout_Ep_queries"] = compare_all(db, q_ep, args.k, args.repeat,
                                                          label + ", held-out passage E_p queries",
                                                          jax_dtype=args.jax_dtype)
    out["prefix_corpus_question_Eq_queries"] = compare_all(db, q_eq, args.k, args.repeat,
                                                           label + ", question E_q queries",
                                                           jax_dtype=args.jax_dtype)
    out["passage_corpus_question_Eq_queries"] = compare_all(
        np.ascontiguousarray(real["p_pre"]).astype(np.float32), q_eq, args.k, args.repeat,
        "real SmolLM2 passage E_p (pre-RoPE), question E_q queries", jax_dtype=args.jax_dtype)
    return out


if __name__ == "__main__":
    main()
