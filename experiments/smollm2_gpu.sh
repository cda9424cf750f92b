#!/usr/bin/env bash
# SmolLM2-135M-Instruct trained as ImpRAG on the full mini-KILT on one GPU, then evaluated -- one command.
#
#   bash experiments/smollm2_gpu.sh                       # configs/smollm2.py as it is (3,000 steps)
#   STEPS=400 TRAIN_BUDGET_S=240 bash experiments/smollm2_gpu.sh   # a run sized to a few minutes
#
# Environment (all optional):
#   DATA            a prepared mini-KILT (`python -m imprag_jax.data.prepare --source ../shared/data --out DIR`);
#                   default: prepared from ../shared/data into WD/data by the trainer
#   WD              workdir (default runs/smollm2_gpu)            OUT_DIR  where the summary files are copied
#   STEPS           train.steps (default: the config's)          TRAIN_BUDGET_S  stop training after this many
#                   seconds and evaluate (0 = no limit)           EVAL_LIMIT  examples per task (default 500)
#   MODES           evaluation modes (default imprag,closed_book: the same trained model with and without its
#                   retrieval)                                   CONFIG  (default configs/smollm2.py)
# The weights come from $IMPRAG_SMOLLM2_GGUF or the fetch cache (`python -m imprag_jax.convert.fetch smollm2`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
WD="${WD:-runs/smollm2_gpu}"
OUT_DIR="${OUT_DIR:-${OUT:-$WD/summary}}"
CONFIG="${CONFIG:-configs/smollm2.py}"
mkdir -p "$WD" "$OUT_DIR"
ARGS=(--config "$CONFIG" --workdir "$WD" --config.train.ckpt_every=0
      --config.eval.limit="${EVAL_LIMIT:-500}" --config.eval.modes="${MODES:-imprag,closed_book}"
      --config.eval.tasks=nq,squad,trex,scifact,hotpotqa)
[[ -n "${DATA:-}" ]] && ARGS+=(--config.data.kind=prepared --config.data.dir="$DATA")
[[ -n "${STEPS:-}" ]] && ARGS+=(--config.train.steps="$STEPS")
[[ -n "${TRAIN_BUDGET_S:-}" ]] && ARGS+=(--config.train.time_budget_s="$TRAIN_BUDGET_S")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== $PY -m imprag_jax.train ${ARGS[*]} $*"
PYTHONUNBUFFERED=1 "$PY" -m imprag_jax.train "${ARGS[@]}" "$@" 2>&1 | tee "$OUT_DIR/train.log"
rc=${PIPESTATUS[0]}
for f in "$WD/metrics.jsonl" "$WD/config.json" "$WD/eval/final.json" "$WD/eval/final.md"; do
  [[ -f "$f" ]] && cp "$f" "$OUT_DIR/"
done
echo "== exit $rc; summary in $OUT_DIR"
exit $rc
