"""Evaluate a trained run: EM / F1 / true-false accuracy per task and retrieval recall@1/5/10.

  python -m imprag_jax.evaluate --workdir runs/synthetic
  python -m imprag_jax.evaluate --workdir runs/synthetic --tasks qa,two_hop_qa --modes imprag,oracle,closed_book \
      --k 1,5 --limit 200 --checkpoint 4000
  python -m imprag_jax.evaluate --config configs/synthetic.py:ra_it --workdir runs/ra_it     # --config optional

The run's `config.json` supplies the model's data settings (L_q, l_max, data folder, tokenizer) and the defaults
of every flag (its `eval` section); `--config` replaces it (and takes `--config.a.b=v` overrides). Modes:
  imprag       retrieve with the model's own E_q (layer b), read the top k (two-stage inference)
  closed_book  no passages
  oracle       the first k gold passages
  bm25         the stored BM25 top k (the RA-IT baseline reads these in context)
Recall: answer-as-substring in the top 1/5/10 passages (the paper's retrieval recall; not for true/false tasks)
and gold-provenance recall, for the model's retrieval (imprag) and for BM25 (bm25).

Writes <workdir>/eval/report.json, report.md, report.png (and predictions.jsonl with --predictions).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from imprag_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); default: <workdir>/config.json.",
                                lock_config=True)
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
flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
flags.DEFINE_bool("predictions", False, "Also write every prediction to predictions.jsonl.")
flags.DEFINE_bool("plot", True, "Write report.png (needs matplotlib; skipped with a note without it).")


def _list(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def _fmt(v):
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


COLUMNS = ["task", "mode", "k", "n", "em", "f1", "accuracy", "answer_recall@1", "answer_recall@5", "answer_recall@10",
           "pool", "gold_recall@1", "gold_recall@5", "gold_recall@10", "gold_recall@20", "chance_gold_recall@5"]


def markdown_table(rows) -> str:
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _score(r):
    """The answer metric of a row: accuracy for true/false tasks, else EM."""
    return r["accuracy"] if r.get("accuracy") is not None else r.get("em")


def _recall(r, kk):
    v = r.get(f"answer_recall@{kk}")
    return v if v is not None else r.get(f"gold_recall@{kk}")


def plot_report(rows, path: str, title: str = "") -> None:
    """Two panels: the answer metric per task (one bar per mode/k), retrieval recall@1/5/10 per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    series = list(dict.fromkeys((r["mode"], r["k"]) for r in rows))
    cmaps = {"imprag": "Blues", "oracle": "Greens", "closed_book": "Greys", "bm25": "Oranges"}

    def color(mode, j, n):
        return plt.get_cmap(cmaps.get(mode, "Purples"))(0.35 + 0.5 * (j + 1) / max(n, 1))

    def shade(mode, k, ks):
        return color(mode, ks.index(k), len(ks))

    ks_of = {m: [k for mm, k in series if mm == m] for m in dict.fromkeys(m for m, _ in series)}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(tasks) + 4), 4.2))
    x = np.arange(len(tasks))
    w = 0.8 / max(1, len(series))
    ax = axes[0]
    for j, (mode, k) in enumerate(series):
        vals = []
        for t in tasks:
            r = next((r for r in rows if r["task"] == t and r["mode"] == mode and r["k"] == k), None)
            vals.append(np.nan if r is None or _score(r) is None else _score(r))
        ax.bar(x + (j - (len(series) - 1) / 2) * w, vals, w, color=shade(mode, k, ks_of[mode]),
               label=f"{mode}" + (f" k={k}" if mode != "closed_book" else ""))
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("EM (accuracy for true/false tasks)")
    ax.set_title("answers")
    ax.legend(fontsize=7)
    ax = axes[1]
    rec = [(m, kk) for m in ("imprag", "bm25") for kk in (1, 5, 10)
           if any(r["mode"] == m and _recall(r, kk) is not None for r in rows)]
    w = 0.8 / max(1, len(rec))
    for j, (m, kk) in enumerate(rec):
        vals = []
        for t in tasks:
            r = next((r for r in rows if r["task"] == t and r["mode"] == m and _recall(r, kk) is not None), None)
            vals.append(np.nan if r is None else _recall(r, kk))
        ax.bar(x + (j - (len(rec) - 1) / 2) * w, vals, w, color=color(m, (1, 5, 10).index(kk), 3),
               label=f"{'ImpRAG' if m == 'imprag' else 'BM25'} @{kk}")
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall@k (answer in passage; gold for true/false)")
    ax.set_title("retrieval")
    if rec:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def count_examples(data_dir: str, task: str, split: str, limit) -> int:
    with open(os.path.join(data_dir, "tasks", f"{task}.{split}.jsonl")) as f:
        n = sum(1 for line in f if line.strip())
    return n if not limit else min(n, limit)


def run(c, workdir: str, *, tasks=None, modes=None, ks=None, limit=None, split=None, step=None, batch_size=None,
        max_new_tokens=None, backend=None, out_dir=None, predictions=False, plot=True, progress=True) -> dict:
    """Evaluate the run in `workdir` (config `c`, or its config.json when None); write the report; return it."""
    from tqdm import tqdm

    from .data.pipeline import available_tasks
    from .train import config_lib
    from .infer.imprag import MODES, evaluate_modes
    from .infer.session import RunError, load_run_config, restore_params, run_data_dir, run_tokenizer

    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir!r} does not exist")
    c = c if c is not None else load_run_config(workdir)
    E = c.eval
    split = split or E.split
    tasks = _list(tasks if tasks is not None else E.tasks)
    modes = _list(modes if modes is not None else E.modes) or ["imprag"]
    ks = [int(x) for x in _list(ks if ks is not None else E.k)] or [1]
    limit = E.limit if limit is None else limit
    limit = int(limit) if limit else None
    from .infer.recall import MODES as RECALL_MODES

    bad = [m for m in modes if m not in MODES + RECALL_MODES]
    if bad or not modes:
        raise RunError(f"unknown mode(s) {bad or modes}; choose from {', '.join(MODES + RECALL_MODES)}")
    if step is not None and int(step) == 0:  # the initial weights of the config (a pretrained model, untrained)
        if c.model.init == "random":
            raise RunError("--checkpoint 0 evaluates the config's initial weights, but model.init is 'random'")
        from .train.trainer import load_model

        cfg, params, _ = load_model(c, None)
        step = 0
    else:
        params, step, cfg = restore_params(workdir, step)
    data_dir = run_data_dir(c, workdir)
    have = available_tasks(data_dir, split)
    missing = [t for t in tasks if t not in have]
    if missing or not tasks:
        raise RunError(f"task(s) {missing or tasks} have no {split} split in {data_dir} (available: {', '.join(have)})")
    tok = run_tokenizer(c, data_dir)
    import jax

    params = jax.tree.map(jax.numpy.asarray, params)
    t0 = time.time()
    retriever = None
    if "imprag" in modes:
        from .data.pipeline import corpus_tokens
        from .infer.imprag import Retriever, passage_texts

        toks, mask = corpus_tokens(data_dir, tok, c.data.l_max)
        pool_sel = None
        if int(E.get("pool", 0)) > 0:  # index a pool holding every evaluated question's gold passage
            from .infer.recall import eval_gold, pool_rows

            pool_sel = pool_rows(len(toks), eval_gold(data_dir, tasks, tok, split=split, limit=limit,
                                                      L_q=config_lib.eval_L_q(c), add_bos=bool(c.data.add_bos)),
                                 int(E.pool), int(c.seed))
        retriever = Retriever.build(params, cfg, toks, mask, passage_texts(data_dir), step=step,
                                    backend=backend or E.backend, rows=pool_sel)
    index_s = time.time() - t0
    total = sum(count_examples(data_dir, t, split, limit) for t in tasks) * len(modes)
    bar = tqdm(total=total, desc="evaluate", unit="ex", dynamic_ncols=True, mininterval=1.0,
               disable=not progress or not cli.stderr_is_terminal())  # no bar in a redirected log
    rows, preds = [], ([] if predictions else None)
    rec_modes = [m for m in modes if m in RECALL_MODES]
    if rec_modes:  # retrieval only: the model's and BM25's recall over the same pool (eval.pool), no generation
        from .data.pipeline import corpus_tokens
        from .infer.imprag import passage_texts
        from .infer.recall import recall_rows

        t1 = time.time()
        rows += recall_rows(params, cfg, data_dir, tasks, tok, corpus=corpus_tokens(data_dir, tok, c.data.l_max),
                            texts=passage_texts(data_dir), modes=rec_modes, split=split, limit=limit,
                            L_q=config_lib.eval_L_q(c), add_bos=bool(c.data.add_bos), pool=int(E.get("pool", 0)),
                            seed=int(c.seed), batch_size=int(batch_size or E.batch_size))
        for r in rows:
            r["seconds"] = round(time.time() - t1, 2)
        bar.update(sum(count_examples(data_dir, t, split, limit) for t in tasks) * len(rec_modes))
    for task in tasks:
        for mode in [m for m in modes if m not in RECALL_MODES]:
            bar.set_postfix(task=task, mode=mode)
            t1 = time.time()
            rs = evaluate_modes(params, cfg, data_dir, task, tok, retriever, mode=mode, ks=ks, split=split,
                                L_q=config_lib.eval_L_q(c), l_max=c.data.l_max,
                                max_new_tokens=int(max_new_tokens or E.max_new_tokens),
                                batch_size=int(batch_size or E.batch_size), limit=limit,
                                use_score_bias=bool(E.score_bias), add_bos=bool(c.data.add_bos),
                                progress=bar.update, predictions=preds)
            for r in rs:
                r["seconds"] = round(time.time() - t1, 2)
            rows.extend(rs)
    bar.close()
    report = {"workdir": os.path.abspath(workdir), "name": c.name, "step": step, "split": split, "limit": limit,
              "tasks": tasks, "modes": modes, "k": ks, "max_new_tokens": int(max_new_tokens or E.max_new_tokens),
              "model": {"num_layers": cfg.num_layers, "b": cfg.b, "t": cfg.t, "hidden_size": cfg.hidden_size},
              "backend": (backend or E.backend) if retriever is not None else None,
              "index_seconds": round(index_s, 2), "seconds": round(time.time() - t0, 2),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    out_dir = out_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"# {c.name}: evaluation at step {step}\n\n"
                f"split `{split}`, {limit or 'all'} examples per task, greedy decoding of up to "
                f"{report['max_new_tokens']} tokens; {report['seconds']:.0f}s "
                f"(index {index_s:.0f}s); {report['date']}\n\n{table}\n\n"
                "EM / F1: KILT (SQuAD) normalisation, best over the aliases; accuracy: true/false tasks (first word "
                "of the answer). answer_recall@k: an answer occurs (normalised) in the top-k passages (the paper's "
                "retrieval recall); gold_recall@k: a gold provenance passage is in the top k. Recall is that of "
                "the model's own retrieval (imprag) or of the stored BM25 ranking (bm25).\n")
    if preds is not None:
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for p in preds:
                f.write(json.dumps(p) + "\n")
    report["png"] = None
    if plot:  # last: the table is written whatever happens here
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            report["png_skipped"] = ("report.png skipped: matplotlib is not installed (pip install matplotlib adds "
                                     "it; --noplot silences this)")
        else:
            report["png"] = os.path.join(out_dir, "report.png")
            plot_report(rows, report["png"], f"{c.name}, step {step}")
    report["table"] = table
    return report


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    if FLAGS.workdir is None:
        cli.fail("--workdir is required (the training run to evaluate), e.g. --workdir runs/synthetic")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from .infer.session import RunError
    from .model import ConfigError

    try:
        rep = run(FLAGS.config, FLAGS.workdir, tasks=FLAGS.tasks, modes=FLAGS.modes, ks=FLAGS.k, limit=FLAGS.limit,
                  split=FLAGS.split, step=FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                  max_new_tokens=FLAGS.max_new_tokens, backend=FLAGS.backend, out_dir=FLAGS.out,
                  predictions=FLAGS.predictions, plot=FLAGS.plot)
    except (RunError, ConfigError) as e:
        cli.fail(str(e))
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval")
    print(f"{rep['name']}, step {rep['step']} ({rep['seconds']:.0f}s)\n{rep['table']}\n\nwrote {out}/report.json, "
          f"report.md" + (", report.png" if rep.get("png") else ""), flush=True)
    if rep.get("png_skipped"):
        print(rep["png_skipped"], file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.absl_flags_parser())
