"""Evaluate a trained run: EM / F1 / true-false accuracy per task and retrieval recall@1/5/10.

  python -m imprag_jax.evaluate --workdir runs/synthetic
  python -m imprag_jax.evaluate --workdir runs/synthetic --tasks qa,two_hop_qa --modes imprag,oracle,closed_book \
      --k 1,5 --limit 200 --checkpoint 4000
  python -m imprag_jax.evaluate --config configs/synthetic.py:ra_it --workdir runs/ra_it     # --config optional
  python -m imprag_jax.evaluate --workdir runs/synthetic --kv_store runs/synthetic/kv    # passages' K/V stored

The run's `config.json` supplies the model's data settings (L_q, l_max, data folder, tokenizer) and the defaults
of every flag (its `eval` section); `--config` replaces it (and takes `--config.a.b=v` overrides). Modes:
  imprag       retrieve with the model's own E_q (layer b), read the top k (two-stage inference)
  closed_book  no passages
  oracle       the first k gold passages
  bm25         the stored BM25 top k (the RA-IT baseline reads these in context)
Recall: answer-as-substring in the top 1/5/10 passages (the paper's retrieval recall; not for true/false tasks)
and gold-provenance recall, for the model's retrieval (imprag) and for BM25 (bm25).

The evaluation itself is `imprag_jax.evaluation` (the trainer's final evaluation is the same code).
Writes <workdir>/eval/report.json, report.md, report.png (and predictions.jsonl with --predictions).

Several processes (one per host, started like the trainer: launch/tpu_pod.sh, launch/gpu_slurm.sh, or
IMPRAG_COORDINATOR / IMPRAG_NUM_PROCESSES / IMPRAG_PROCESS_ID): jax.distributed is initialised as the trainer does
(--distributed, default: when the environment names several processes), the index is built on the global mesh
with each process encoding its share of the passages, every example is evaluated on every process and process 0
alone writes the report; the same rows as one process. --kv_store and --backend scann are single-process.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from imprag_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file (configs/*.py[:arg]; overrides: --config.a.b=v); default: "
                    "<workdir>/config.json.")
flags.DEFINE_string("workdir", None, "The training run directory.")
flags.DEFINE_string("tasks", None, "Comma-separated tasks (default: the config's eval.tasks).")
flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the latest); 0 = the config's initial "
                     "(pretrained) weights, no training run needed (e.g. a zero-shot baseline).")
flags.DEFINE_string("modes", None, "Comma-separated of imprag,oracle,closed_book,bm25 (generation) and recall,"
                    "bm25_recall (retrieval only, over eval.pool passages) (default: eval.modes).")
flags.DEFINE_string("k", None, "Comma-separated passages to read (default: eval.k).")
flags.DEFINE_integer("limit", None, "Examples per task (default: eval.limit; 0 = all).")
flags.DEFINE_string("split", None, "Split (default: eval.split).")
flags.DEFINE_integer("batch_size", None, "Prompts per batch (default: eval.batch_size).")
flags.DEFINE_integer("max_new_tokens", None, "Greedy decoding length (default: eval.max_new_tokens).")
flags.DEFINE_string("backend", None, "Index search: exact|binned|approx|scann (default: eval.backend).")
flags.DEFINE_string("kv_store", None, "A passage K/V store folder (python -m imprag_jax.kv_store build): "
                    "mode imprag loads the retrieved passages' middle-group K/V from it (independent passage "
                    "attention only).")
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
flags.DEFINE_bool("predictions", False, "Also write every prediction to predictions.jsonl.")
flags.DEFINE_bool("plot", True, "Write report.png (needs matplotlib; skipped with a note without it).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when the environment names "
                  "several processes).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    if FLAGS.workdir is None:
        cli.fail("--workdir is required (the training run to evaluate), e.g. --workdir runs/synthetic")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from .train.distributed import maybe_initialize

    maybe_initialize(FLAGS.distributed)  # before anything touches a device
    import jax

    from .evaluation import run
    from .model import ConfigError
    from .run import RunError

    try:
        rep = run(cli.loaded_config(), FLAGS.workdir, tasks=FLAGS.tasks, modes=FLAGS.modes, ks=FLAGS.k,
                  limit=FLAGS.limit, split=FLAGS.split, step=FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                  max_new_tokens=FLAGS.max_new_tokens, backend=FLAGS.backend, out_dir=FLAGS.out,
                  predictions=FLAGS.predictions, plot=FLAGS.plot, kv_store=FLAGS.kv_store)
    except (RunError, ConfigError) as e:
        cli.fail(str(e))
    if not rep["written"]:  # another process of a multi-process evaluation: process 0 writes and prints
        return
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval")
    print(f"{rep['name']}, step {rep['step']} ({rep['seconds']:.0f}s)\n{rep['table']}\n\nwrote {out}/report.json, "
          f"report.md" + (", report.png" if rep.get("png") else "")
          + (f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""), flush=True)
    if rep.get("png_skipped"):
        print(rep["png_skipped"], file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser())
