"""How much a precomputed passage K/V store changes what a real-size model answers (infer/kv_store.py).

Pretrained SmolLM2-135M-Instruct weights (the cached GGUF, `resolve_model("smollm2")`) read as an ImpRAG model
with independent passage attention (b = 7, t = 21, fp32; no checkpoint trained that way exists, so this reader
and its retrieval are untrained). On `--n` NQ dev questions of a prepared mini-KILT folder, over a pool of
`--pool` passages (every question's gold passage plus a seeded sample of the others), each question reads k
passages and generates greedily, once recomputing the passages' middle-group K/V (`read_passages`) and once per
store variant (loaded with `KVStore.load`). Reported per variant: EM, F1, and the share of predictions identical
to recomputation's; plus store bytes and build time.

`--read retrieved`: the model's own top k over the pool (E_q . E_p); `--read oracle`: the gold passage in slot
0, then the model's top-ranked other passages up to k (for an untrained retriever at chance, so that the answer
is at least in the context).

    python benchmarks/kv_store_em.py --data /work/main/runs/exp/minikilt_full --n 50 --pool 300 --k 4 \\
        --variants f16,pq,h2o --read oracle --json out/kv_store_em.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {"f32": {}, "f16": {"dtype": "float16"}, "pq": {"pq_m": 16},
            "h2o": {"h2o": 0.5, "dtype": "float16"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a prepared mini-KILT folder (read only)")
    ap.add_argument("--task", default="nq")
    ap.add_argument("--n", type=int, default=50, help="dev questions")
    ap.add_argument("--pool", type=int, default=300, help="passages searched (gold ones + a seeded sample)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--read", default="oracle", choices=("retrieved", "oracle"))
    ap.add_argument("--variants", default="f16,pq,h2o", help=f"store variants among {sorted(VARIANTS)}")
    ap.add_argument("--l_max", type=int, default=128)
    ap.add_argument("--L_q", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=10, help="questions per generation batch")
    ap.add_argument("--pq_train", type=int, default=4096)
    ap.add_argument("--store_dir", default="/tmp/kv_store_em")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from imprag_jax.convert.fetch import resolve_model
    from imprag_jax.data.pipeline import TITLE_FORMAT, TruncationStats, _Encoder, _passage_rows
    from imprag_jax.infer import metrics as M
    from imprag_jax.infer.imprag import Retriever, encode, prompts_from_batch, read_and_generate
    from imprag_jax.infer.kv_store import build_store, open_store
    from imprag_jax.infer.recall import _collect, pool_rows

    t0 = time.time()
    cfg, params, tok = resolve_model("smollm2", b=7, t=21, passage_attention="independent", dtype="float32")
    params = jax.tree.map(jnp.asarray, params)
    q = _collect(a.data, a.task, "dev", tok, limit=a.n, L_q=a.L_q, add_bos=False, batch_size=a.n)
    valid = np.nonzero(q["valid"])[0]
    qt, qm = np.concatenate(q["tokens"])[valid], np.concatenate(q["mask"])[valid]
    gold = [q["gold"][i] for i in valid]
    answers = [q["answers"][i] for i in valid]
    ps, _ = _passage_rows(a.data)
    rows = pool_rows(len(ps), gold, a.pool, a.seed)
    local = {int(r): i for i, r in enumerate(rows)}
    pt, pm = _Encoder(tok, TITLE_FORMAT, False).passages([(ps[r][1], ps[r][2]) for r in rows], a.l_max,
                                                          TruncationStats())
    print(f"[kv_store_em] {len(valid)} questions, pool {len(rows)} passages ({int(pm.sum())} tokens, "
          f"{pm.sum() / len(rows):.1f} per passage), setup {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    ret = Retriever.build(params, cfg, pt, pm, batch_size=16)
    stop = tok.stop_ids
    ids_all, encs = [], []
    for s in range(0, len(valid), a.batch):
        enc = encode(params, cfg, prompts_from_batch(qt[s:s + a.batch], qm[s:s + a.batch]), pad_id=tok.pad_id,
                     max_new_tokens=a.max_new_tokens)
        _, ids = ret.search(enc.e_q, max(a.k + 1, 10))
        encs.append(enc)
        ids_all.append(ids)
    ranked = np.concatenate(ids_all)
    gl = [[local[g] for g in gs] for gs in gold]
    recall = {kk: float(np.mean([bool(set(gl[i]) & set(ranked[i, :kk].tolist())) for i in range(len(gl))]))
              for kk in (1, 4, 10)}
    chance = {kk: float(np.mean([min(1.0, kk * len(g) / len(rows)) for g in gl])) for kk in (1, 4, 10)}
    if a.read == "retrieved":
        read = ranked[:, :a.k]
    else:
        read = np.array([([g[0]] + [int(j) for j in ranked[i] if int(j) != g[0]])[:a.k] for i, g in enumerate(gl)])

    def generate(store=None):
        outs, t1 = [], time.time()
        for bi, s in enumerate(range(0, len(valid), a.batch)):
            ids = read[s:s + a.batch]
            ptk, pmk = pt[ids], pm[ids]
            pkv = None if store is None else store.load(ids, cfg)
            outs += read_and_generate(params, cfg, encs[bi], ptk, pmk, stop_ids=stop, pkv=pkv)
        preds = [tok.decode(o).strip() for o in outs]
        return preds, time.time() - t1

    def score(preds, ref=None):
        r = {"em": float(np.mean([M.exact_match(p, ans) for p, ans in zip(preds, answers)])),
             "f1": float(np.mean([M.f1_score(p, ans) for p, ans in zip(preds, answers)]))}
        if ref is not None:
            r["identical"] = int(sum(x == y for x, y in zip(preds, ref)))
        return r

    base, dt = generate()
    res = {"recompute": {**score(base), "generate_seconds": round(dt, 1)}}
    print(f"[kv_store_em] recompute: {res['recompute']}", file=sys.stderr, flush=True)
    all_preds = {"recompute": base}
    for name in [v for v in a.variants.split(",") if v]:
        d = os.path.join(a.store_dir, name)
        man = build_store(params, cfg, pt, pm, d, batch_size=16, shard_size=128, progress=False,
                          pq_train=a.pq_train, overwrite=True, **VARIANTS[name])
        store = open_store(d, params, cfg)
        preds, dt = generate(store)
        res[name] = {**score(preds, base), "options": VARIANTS[name], "generate_seconds": round(dt, 1),
                     "kv_bytes_per_passage": round(man["kv_bytes_per_passage"]), "codec_bytes": man["codec_bytes"],
                     "build_seconds": man["build_seconds"]}
        all_preds[name] = preds
        print(f"[kv_store_em] {name}: {res[name]}", file=sys.stderr, flush=True)
        shutil.rmtree(d)
    out = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), pretrained, not trained as ImpRAG",
           "b": cfg.b, "t": cfg.t, "passage_attention": cfg.passage_attention, "task": a.task, "n": len(valid),
           "pool": len(rows), "k": a.k, "read": a.read, "l_max": a.l_max, "max_new_tokens": a.max_new_tokens,
           "gold_recall": recall, "chance_gold_recall": chance, "results": res,
           "predictions": [{"answers": answers[i], **{n: p[i] for n, p in all_preds.items()}}
                           for i in range(len(valid))],
           "seconds": round(time.time() - t0, 1), "jax": jax.__version__}
    print(json.dumps({k: v for k, v in out.items() if k != "predictions"}, indent=2))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
