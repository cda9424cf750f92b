"""`python -m imprag_jax.kv_store build|info`: a run's precomputed passage K/V store (the library is
`imprag_jax.infer.kv_store`; paper App. C, independent passage attention only).

    python -m imprag_jax.kv_store build --workdir RUN --out DIR [--dtype float16 | --h2o R | --pq_m M]
    python -m imprag_jax.kv_store info DIR

An interrupted build resumes when the same command is run again; user mistakes print one line and exit 2.
"""
from __future__ import annotations

import json
import os
import sys

from . import cli
from . import run as R
from .data.pipeline import corpus_tokens
from .infer.kv_store import (MANIFEST, KVStore, KVStoreError, build_store, check_independent,
                             check_options)


def _build_cli(a) -> None:

    if os.path.exists(os.path.join(a.out, MANIFEST)) and not a.overwrite:
        cli.fail(f"{a.out} already holds a store; pass --overwrite to replace it or choose another --out")
    try:
        c = R.load_run_config(a.workdir)
        params, step, cfg = R.restore_params(a.workdir, a.checkpoint)
        check_independent(cfg)
        check_options(cfg, a.h2o, a.pq_m, a.dtype)
        data_dir = R.existing_data_dir(c, a.workdir)
        tok = R.tokenizer(c, data_dir)
    except (R.RunError, KVStoreError) as e:
        cli.fail(str(e))
    toks, mask = corpus_tokens(data_dir, tok, c.data.l_max)
    with cli.remove_if_unused(a.out):
        try:
            man = build_store(params, cfg, toks, mask, a.out, h2o=a.h2o, h2o_score=a.h2o_score, pq_m=a.pq_m,
                              pq_train=a.pq_train, dtype=a.dtype, shard_size=a.shard_size, batch_size=a.batch_size,
                              progress=cli.stderr_is_terminal(), overwrite=a.overwrite,
                              extra={"checkpoint_step": int(step)})
        except KVStoreError as e:
            cli.fail(str(e))
        except KeyboardInterrupt:
            print(f"interrupted: the shards written so far are kept in {a.out}; run the same command again to "
                  "resume", file=sys.stderr, flush=True)
            sys.exit(130)
    print(f"wrote {a.out}: {man['n']} passages, {man['disk_bytes_per_passage'] / 1024:.1f} KiB per passage, "
          f"{man['build_seconds']:.1f}s")


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m imprag_jax.kv_store",
                            description="Precomputed passage K/V (independent passage attention only).")
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("build", help="write the store of a run's corpus")
    b.error = ap.error
    b.add_argument("--workdir", required=True, help="the training run")
    b.add_argument("--out", required=True, help="the store folder")
    b.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
    b.add_argument("--h2o", type=float, default=None, help="keep this ratio of each passage's tokens (H2O)")
    b.add_argument("--h2o_score", default="sum", choices=("sum", "mean"),
                   help="H2O token score: accumulated attention received (sum) or per query that sees it (mean)")
    b.add_argument("--pq_m", type=int, default=None, help="product quantization: sub-vectors per head vector")
    b.add_argument("--pq_train", type=int, default=20000, help="token vectors to train each PQ codec on")
    b.add_argument("--dtype", default="float32", help="stored K/V dtype without PQ: float32 | float16")
    b.add_argument("--shard_size", type=int, default=4096)
    b.add_argument("--batch_size", type=int, default=64)
    b.add_argument("--overwrite", action="store_true",
                   help="replace the store (or the unfinished build) in --out; without it an interrupted build with "
                        "the same weights, corpus and options resumes")
    i = sub.add_parser("info", help="print a store's manifest")
    i.error = ap.error
    i.add_argument("path")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        _build_cli(a)
    elif a.cmd == "info":
        try:
            print(json.dumps(KVStore(a.path).manifest, indent=2))
        except KVStoreError as e:
            cli.fail(str(e))
    else:
        ap.error("choose a command: build or info")


if __name__ == "__main__":
    main()
