"""Recall of the implicit retriever against training steps, read from runs' metrics.jsonl (the `dev/...` rows that
`train.eval_every` writes, plus the final evaluation), with BM25 on the same pool and the chance level beside it.

    python experiments/recall_curve.py RUN_DIR [RUN_DIR ...] [--out docs/recall_curve.png] [--k 5]

Prints one table per run (step, and gold recall@k per task) and, when matplotlib is installed, writes a PNG with
one line per run and task (dashed: BM25 on the same pool; dotted: chance).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def curve(run_dir: str, k: int = 5):
    """{task: [(step, recall)]}, {task: bm25 recall}, {task: chance} from a run's metrics.jsonl."""
    rec, bm25, chance = {}, {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for key, v in row.items():
                parts = key.split("/")
                if len(parts) == 4 and parts[0] == "dev" and parts[3] == f"gold_recall@{k}":
                    task, mode = parts[1], parts[2]
                elif len(parts) == 5 and parts[0] == "eval" and parts[4] == f"gold_recall@{k}":
                    task, mode = parts[1], parts[2]
                else:
                    if len(parts) >= 4 and parts[-1] == f"chance_gold_recall@{k}":
                        chance[parts[1]] = v
                    continue
                if mode == "recall":
                    pts = rec.setdefault(task, [])
                    if not pts or pts[-1][0] != row["step"]:
                        pts.append((row["step"], v))
                elif mode == "bm25_recall":
                    bm25[task] = v
    return rec, bm25, chance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    data = {}
    for r in a.runs:
        if not os.path.exists(os.path.join(r, "metrics.jsonl")):
            print(f"error: {r} has no metrics.jsonl", file=sys.stderr)
            return 2
        data[r] = curve(r, a.k)
        rec, bm25, chance = data[r]
        print(f"## {r}\n\n| step | " + " | ".join(f"{t} R@{a.k}" for t in rec) + " |")
        print("|---:|" + "---:|" * len(rec))
        steps = sorted({s for pts in rec.values() for s, _ in pts})
        for s in steps:
            print(f"| {s} | " + " | ".join(f"{dict(pts).get(s, float('nan')):.3f}" for pts in rec.values()) + " |")
        print("\nBM25 (same pool): " + ", ".join(f"{t} {v:.3f}" for t, v in bm25.items())
              + "; chance: " + ", ".join(f"{t} {v:.4f}" for t, v in chance.items()) + "\n")
    if a.out:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(7, 4.2))
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        i = 0
        for r, (rec, bm25, chance) in data.items():
            for task, pts in rec.items():
                c = colors[i % len(colors)]
                i += 1
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", color=c,
                        label=f"{os.path.basename(os.path.normpath(r))} {task}")
                if task in bm25:
                    ax.axhline(bm25[task], color=c, ls="--", lw=0.8)
                if task in chance:
                    ax.axhline(chance[task], color=c, ls=":", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"gold recall@{a.k}")
        ax.set_ylim(0, 1)
        ax.set_title(f"implicit retriever, gold recall@{a.k} (dashed: BM25, same pool; dotted: chance)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.out, dpi=120)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
