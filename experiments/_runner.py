"""What the experiment runners share: choosing a row on the command line and recording a finished run."""
from __future__ import annotations

import json
import os
import platform
import sys
import time


def check_row(a, rows: dict) -> int | None:
    """`--list` / no row / an unknown row: print and return the exit code; None when `a.row` is a known row."""
    if a.list or not a.row:
        for name, spec in rows.items():
            print(f"{name:16s} {spec[-1]}")
        return 0 if a.list else 2
    if a.row not in rows:
        print(f"error: unknown row {a.row!r}; known: {', '.join(rows)}", file=sys.stderr)
        return 2
    return None


def record(out: str, *, row: str, seed: int, steps: int, train_seconds: float, wall_seconds, command: list,
           evals: list, final_metrics: dict | None = None) -> None:
    """Append one summary line to OUT/results.jsonl (what experiments/report.py reads; the last line of a
    (row, seed) wins)."""
    line = dict(row=row, seed=seed, steps=steps, train_seconds=train_seconds, wall_seconds=wall_seconds,
                machine=f"{platform.machine()} {os.cpu_count()} cpu", date=time.strftime("%Y-%m-%d"),
                command=" ".join(command), eval=evals)
    if final_metrics is not None:
        line["final_metrics"] = final_metrics
    path = os.path.join(out, "results.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"[experiments] {row} seed {seed}: {steps} steps, {train_seconds:.0f}s training; appended to {path}")
