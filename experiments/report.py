"""Tables (markdown) and a PNG from the runs collected by experiments/synthetic.py.

    python experiments/report.py [--out runs/experiments] [--md FILE] [--png FILE]

One row per experiment: EM and recall@5 (gold passage) for the seen format (QA) and the unseen ones (slot filling,
fact verification, entity linking), each as the mean over the seeds run, with the spread (min-max) when there is
more than one seed. EM is read with the top-1 retrieved passage (ImpRAG rows), the BM25 top-k in context (RA-IT)
or no passage (closed-book); recall@5 is over the whole corpus with the row's own retriever (BM25 for RA-IT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sibling(name: str):
    """experiments/<name>.py by path (configs/ has modules of the same names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"imprag_experiments_{name}",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               f"{name}.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


ROWS = _sibling("synthetic").ROWS
SMOLLM2_ROWS = _sibling("smollm2").ROWS

SYNTHETIC_TASKS = [("qa", "QA (seen)"), ("slot_filling", "slot filling"), ("fact_verification", "fact verif."),
                   ("entity_linking", "entity linking")]
SMOLLM2_TASKS = [("nq", "NQ (seen)"), ("squad", "SQuAD (seen)"), ("trex", "T-REx"), ("scifact", "SciFact"),
                 ("hotpotqa", "HotpotQA")]
TASKS = SYNTHETIC_TASKS


def pick(evals: list, task: str, f1: bool = False):
    """(EM or accuracy, gold recall@5[, token F1]) of the row's main reading mode for `task`: ImpRAG with its
    smallest k, else bm25, else closed-book."""
    rows = [e for e in evals if e["task"] == task]
    for mode in ("imprag", "bm25", "closed_book"):
        c = sorted([e for e in rows if e["mode"] == mode], key=lambda e: e["k"])
        if c:
            e = c[0]
            em = e["accuracy"] if e.get("accuracy") is not None else e.get("em")
            return (em, e.get("gold_recall@5"), e.get("f1")) if f1 else (em, e.get("gold_recall@5"))
    return (None, None, None) if f1 else (None, None)


def fmt(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    m = float(np.mean(vals))
    if len(vals) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ({min(vals):.3f}–{max(vals):.3f})"


def row_names(runs: dict) -> list:
    """Rows in their runner's order (experiments/smollm2.py's for the SmolLM2 tasks), then any others."""
    first, second = (SMOLLM2_ROWS, ROWS) if TASKS is SMOLLM2_TASKS else (ROWS, SMOLLM2_ROWS)
    order = list(first) + [r for r in second if r not in first]
    return [r for r in order if r in runs] + sorted(r for r in runs if r not in order)


def load(out: str) -> dict:
    runs = defaultdict(dict)
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"no {path}: run experiments/synthetic.py ROW first")
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            runs[r["row"]][r["seed"]] = r  # a rerun of the same seed replaces the older line
    return runs


def table(runs: dict, rows: list = (), f1: bool = False) -> str:
    """One line per row (`rows`: only these, in this order); `f1`: a token-F1 column after each EM column."""
    em = lambda t: "acc." if t in ("fact_verification", "scifact") else "EM"  # noqa: E731  true/false tasks
    per = (lambda t, n: f"{n} {em(t)} | {n} F1 | {n} R@5") if f1 else (lambda t, n: f"{n} {em(t)} | {n} R@5")
    head = "| row | seeds | steps | " + " | ".join(per(t, n) for t, n in TASKS) + " | train s / run |"
    sep = "|" + "---|" * (4 + (3 if f1 else 2) * len(TASKS))
    lines = [head, sep]
    missing = [r for r in rows if r not in runs]
    if missing:
        raise ValueError(f"no results for row(s) {', '.join(missing)} (known: {', '.join(row_names(runs))})")
    for row in (list(rows) or row_names(runs)):
        rs = list(runs[row].values())
        cells = []
        for task, _ in TASKS:
            vals = list(zip(*[pick(r["eval"], task, f1) for r in rs]))
            if f1:
                cells += [fmt(list(vals[0])), fmt(list(vals[2])), fmt(list(vals[1]))]
            else:
                cells += [fmt(list(vals[0])), fmt(list(vals[1]))]
        steps = sorted({r["steps"] for r in rs})
        secs = np.mean([r["train_seconds"] for r in rs])
        lines.append(f"| {row} | {len(rs)} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def plot(runs: dict, path: str, rows: list = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows) or row_names(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    w = 0.8 / len(TASKS)
    for a, (what, idx) in zip(axes, (("EM", 0), ("gold recall@5", 1))):
        for i, (task, name) in enumerate(TASKS):
            vals = []
            for row in rows:
                v = [pick(r["eval"], task)[idx] for r in runs[row].values()]
                v = [x for x in v if x is not None]
                vals.append((np.mean(v), np.min(v), np.max(v)) if v else (np.nan, np.nan, np.nan))
            m = np.array([x[0] for x in vals])
            err = np.array([[x[0] - x[1] for x in vals], [x[2] - x[0] for x in vals]])
            a.bar(np.arange(len(rows)) + i * w, m, w, yerr=err, label=name, capsize=2)
        a.set_xticks(np.arange(len(rows)) + 0.4 - w / 2)
        a.set_xticklabels(rows, rotation=35, ha="right", fontsize=8)
        a.set_ylim(0, 1.05)
        a.set_title(("SmolLM2, mini-KILT dev" if TASKS is SMOLLM2_TASKS else "synthetic world, held-out people")
                    + f": {what}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="the runner's output folder (default runs/experiments, with "
                                                  "--smollm2 runs/experiments_smollm2)")
    ap.add_argument("--md", default="", help="also write the table here")
    ap.add_argument("--png", default="", help="bar plot of EM and recall@5 per row and task")
    ap.add_argument("--smollm2", action="store_true", help="the SmolLM2 mini-KILT tasks (experiments/smollm2.py)")
    ap.add_argument("--rows", default="", help="comma-separated rows to show, in this order (default: all)")
    ap.add_argument("--f1", action="store_true", help="a token-F1 column beside each EM")
    a = ap.parse_args(argv)
    global TASKS
    TASKS = SMOLLM2_TASKS if a.smollm2 else SYNTHETIC_TASKS
    runs = load(a.out or os.path.join(ROOT, "runs", "experiments_smollm2" if a.smollm2 else "experiments"))
    try:
        md = table(runs, [r for r in a.rows.split(",") if r], a.f1)
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.png:
        plot(runs, a.png, [r for r in a.rows.split(",") if r])
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
