"""SmolLM2-135M-Instruct on a real mini-KILT: one command per table row, sized for a CPU (`configs/smollm2.py:cpu`).

    python experiments/smollm2.py ROW [--limit 200] [--steps N] [--seed S] [--out runs/experiments_smollm2]
    python experiments/smollm2.py --list

The mini-KILT is prepared once into `OUT/minikilt_limit{L}` (`python -m imprag_jax.data.prepare --limit L`:
at most L records per source file, so the corpus is a few thousand passages and the index fits a CPU evaluation)
with the retrieval-free training tasks (SQuAD with its passage, phrase denoising, sentence generation, plain text).
Rows starting with `zs_` evaluate the pretrained model as it is (`evaluate --checkpoint 0`); the others fine-tune
it for `--steps` steps (`configs/smollm2.py:cpu[,closed_book|,ra_it]`) and evaluate the result. Seen formats:
NQ, SQuAD (dev); unseen: T-REx slot filling, SciFact true/false, HotpotQA. Summary lines go to
`OUT/results.jsonl` (the same layout as experiments/synthetic.py; `experiments/report.py --smollm2` reads it).
On the GPU, drop `:cpu` and the limit: `python -m imprag_jax.train --config configs/smollm2.py --workdir W`.

The `retriever*` rows (`configs/smollm2.py:retriever`) use the whole mini-KILT (`OUT/minikilt_full`: 2,124 NQ and
8,457 SQuAD training questions) and train the retrieval path alone; they report gold recall of the implicit
retriever and of BM25 over the same 4,000-passage pool on NQ and SQuAD dev, and a recall-vs-steps curve in
metrics.jsonl (`experiments/recall_curve.py` plots it).

The `*_full` / `*_r` rows are the comparison on that budget (docs/results.md section 3b): 60 steps at the `cpu`
shapes on the whole mini-KILT, evaluated over a 4,000-passage pool; `imprag_warmup_r` / `imprag_distill_r` start
from the `retriever` row's run (run it first), `imprag_full` from SmolLM2-Instruct's own weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runner import check_row, record  # noqa: E402
TASKS = "nq,squad,trex,scifact,hotpotqa"
# passages of 128 tokens as the retriever row's (its E_p is the end marker's key state), a 4,000-passage pool
FULL_EVAL = ["--config.data.l_max=128", "--config.eval.pool=4000", "--config.eval.limit=100"]
# row: (config arguments, evaluate the initial weights?, extra overrides, data, what it is); data "limit" = the
# `--limit`-prepared mini-KILT, "full" = the whole mini-KILT (every NQ and SQuAD training question)
ROWS = {
    "zs_closed_book": ("cpu,closed_book", True, [], "limit", "SmolLM2-Instruct as it is, no passages"),
    "zs_bm25": ("cpu,ra_it", True, [], "limit", "SmolLM2-Instruct as it is, the BM25 top 4 in context"),
    "zs_imprag": ("cpu", True, [], "limit",
                  "SmolLM2-Instruct as it is, read as ImpRAG (its own layer-7 retrieval, untrained)"),
    "closed_book": ("cpu,closed_book", False, [], "limit", "fine-tuned without passages"),
    "ra_it": ("cpu,ra_it", False, [], "limit", "RA-IT: fine-tuned with the BM25 top 4 in context"),
    "imprag": ("cpu", False, [], "limit", "ImpRAG: NCE warmup then self-distillation, retrieval-free rows mixed in"),
    "retriever": ("retriever", False, [], "full",
                  "the retrieval path alone (bottom group + layer-7 q/k) under the NCE with gold positives, "
                  "s = q.k / sqrt(64), last-token pooling (the paper's E_q/E_p); gold recall vs BM25, same pool"),
    "retriever_mean": ("retriever", False, ["--config.model.retrieval_pool=mean"], "full",
                       "as `retriever` with mean pooling over the tokens (an option beyond the paper)"),
    "retriever_raw": ("retriever", False, ["--config.model.score_scale=raw"], "full",
                      "as `retriever` with the raw dot product (the paper's Eq. 3 as written)"),
    # the b sweep (the paper's Figure 2 at the retriever stage): the same recipe with E_q/E_p at another layer;
    # run each with the same `--steps` (docs/results.md section 3a: 100 steps) and compare with `retriever`
    **{f"retriever_b{b}": ("retriever", False, [f"--config.model.b={b}"], "full",
                           f"as `retriever` with b = {b} (E_q/E_p from layer {b}; layers 0-{b - 1} trained)")
       for b in (4, 10, 13)},
    # the real-data comparison on the retriever's budget: every row fine-tunes at the cpu shapes on the whole
    # mini-KILT and evaluates over a 4,000-passage pool holding the evaluated questions' gold passages
    "closed_book_full": ("cpu,closed_book", False, FULL_EVAL, "full", "fine-tuned without passages"),
    "ra_it_full": ("cpu,ra_it", False, FULL_EVAL, "full", "RA-IT: fine-tuned with the BM25 top 4 in context"),
    "imprag_warmup_r": ("cpu", False, FULL_EVAL + ["--config.train.init_from={retriever}",
                                                   "--config.train.stages=warmup"], "full",
                        "ImpRAG from the `retriever` row's weights: NCE + generation loss (warmup only)"),
    "imprag_distill_r": ("cpu", False, FULL_EVAL + ["--config.train.init_from={retriever}"], "full",
                         "ImpRAG from the `retriever` row's weights: NCE warmup, then self-distillation"),
    # diagnostic: the same fine-tuning from SmolLM2-Instruct's own weights (no retrieval stage), to tell the reading
    # layout's cost from the retrieval stage's
    "imprag_full": ("cpu", False, FULL_EVAL, "full",
                    "ImpRAG from SmolLM2-Instruct's weights (no retrieval stage): NCE warmup, then self-distillation"),
}


def data_dir(out: str, row: str, limit: int) -> str:
    return os.path.join(out, "minikilt_full" if ROWS[row][3] == "full" else f"minikilt_limit{limit}")


def prepare(out: str, limit: int, full: bool = False) -> str:
    d = os.path.join(out, "minikilt_full" if full else f"minikilt_limit{limit}")
    if not os.path.exists(os.path.join(d, "stats.json")):
        cmd = [sys.executable, "-m", "imprag_jax.data.prepare", "--source", os.path.join(ROOT, "..", "shared", "data"),
               "--out", d, "--free_per_task", str(2000 if full else 3 * limit), "--no_progress"] + (
                   [] if full else ["--limit", str(limit)])
        print("[experiments] " + " ".join(cmd), flush=True)
        subprocess.check_call(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    return d


def row_command(row: str, data: str, wd: str, steps: int, seed: int = 0) -> list:
    args, zero_shot, extra, _, _ = ROWS[row]
    cfg = os.path.join(ROOT, "configs", "smollm2.py") + ":" + args
    retriever = os.path.join(os.path.dirname(os.path.normpath(wd)), "retriever")  # the retriever row's run
    common = [f"--config.data.dir={data}", f"--config.seed={seed}"] + [x.replace("{retriever}", retriever)
                                                                       for x in extra]
    if args != "retriever":
        common.append(f"--config.eval.tasks={TASKS}")
    if zero_shot:
        return [sys.executable, "-m", "imprag_jax.evaluate", "--config", cfg, "--workdir", wd, "--checkpoint", "0",
                "--noplot"] + common
    steps_args = [f"--config.train.steps={steps}"] if steps else []
    if steps and args == "retriever":
        steps_args.append(f"--config.train.retrieval_steps={steps}")
    return [sys.executable, "-m", "imprag_jax.train", "--config", cfg, "--workdir", wd] + common + steps_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", nargs="?")
    ap.add_argument("--limit", type=int, default=200, help="records per source file in the mini-KILT")
    ap.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "experiments_smollm2"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--dry_run", action="store_true")
    a = ap.parse_args(argv)
    rc = check_row(a, ROWS)
    if rc is not None:
        return rc
    out = os.path.abspath(a.out)
    wd = os.path.join(out, a.row if a.seed == 0 else f"{a.row}_seed{a.seed}")
    data = data_dir(out, a.row, a.limit)
    cmd = row_command(a.row, data, wd, a.steps, a.seed)
    if a.dry_run:
        print(" ".join(cmd))
        return 0
    os.makedirs(wd, exist_ok=True)
    prepare(out, a.limit, full=ROWS[a.row][3] == "full")
    print("[experiments] " + " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        print(f"[experiments] {a.row} failed (exit {rc})", file=sys.stderr)
        return rc
    zero_shot = ROWS[a.row][1]
    with open(os.path.join(wd, "eval", "report.json" if zero_shot else "final.json")) as f:
        res = json.load(f)
    record(out, row=a.row, seed=a.seed, steps=0 if zero_shot else res["step"],
           train_seconds=0.0 if zero_shot else res["train_seconds"], wall_seconds=time.time() - t0,
           command=["python", "experiments/smollm2.py", a.row, f"--limit={a.limit}", f"--seed={a.seed}"] + (
               [f"--steps={a.steps}"] if a.steps else []), evals=res.get("eval") or res.get("rows") or [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
