"""Export a trained run as a Hugging Face `LlamaForCausalLM` directory plus `imprag.json`.

    python -m imprag_jax.export --workdir runs/x --out hf_dir [--step S] [--dtype float32|bfloat16]
                                [--max_shard_bytes N]

The format (the embedding-scale fold, imprag.json's fields) and its reader are `imprag_jax.convert.export`; this
module reads the run (config, checkpoint parameters, tokenizer) through `imprag_jax.run` and writes it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np

from . import run as R
from .convert.export import ExportError, build_meta, export_model


def export_run(workdir: str, out: str, step: Optional[int] = None, dtype: str = "float32",
               max_shard_bytes: Optional[int] = None, log=print) -> dict:
    """Export checkpoint `step` (default: the latest) of the run in `workdir`. Returns imprag.json's dict."""
    import jax

    t0 = time.time()
    try:
        c = R.load_run_config(workdir)
        params, step, cfg = R.restore_params(workdir, step, step_flag="--step")
        tok = R.tokenizer(c, R.data_dir_path(c, workdir))
    except R.RunError as e:
        raise ExportError(str(e)) from None
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    ks = R.eval_ks(c)
    meta = build_meta(cfg, tok, k=ks[0] if ks else c.data.k, l_max=c.data.l_max, L_q=R.eval_L_q(c),
                      L_r=c.data.L_r, add_bos=c.data.add_bos, k_train=c.data.k,
                      score_bias=bool(c.eval.get("score_bias", False)),
                      source={"workdir": os.path.abspath(workdir),
                              "step": int(step), "run": c.name, "model_init": c.model.init})
    export_model(params, cfg, tok, out, meta, dtype=dtype, max_shard_bytes=max_shard_bytes)
    log(f"[export] step {step} of {workdir} -> {out} ({cfg.num_params() / 1e6:.2f}M params, {dtype}"
        + (f", embed_scale {cfg.embed_scale:g} folded into the weights" if cfg.embed_scale != 1.0 else "")
        + f") in {time.time() - t0:.1f}s")
    return meta


def main(argv=None) -> int:
    from .cli import ArgumentParser

    ap = ArgumentParser(prog="python -m imprag_jax.export", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max_shard_bytes", type=int, default=None, help="split the weights above this size "
                    "(default 2 GiB)")
    a = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("safetensors") is None:  # say so before any work, not after restoring the run
        print('export: writing model.safetensors needs the safetensors package: pip install -e ".[torch]" '
              "(or pip install safetensors)", file=sys.stderr)
        return 2
    from .cli import remove_if_unused

    try:
        with remove_if_unused(a.out):  # a failed export leaves no empty --out folder behind
            export_run(a.workdir, a.out, a.step, a.dtype, a.max_shard_bytes)
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
