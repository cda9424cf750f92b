#!/usr/bin/env bash
# The GPU performance check in ONE call (~7 min of a ~8 min budget, the machine start not included):
# the bf16 Llama-3.2-3B-shape plain-LM step (T = 2048) and the ImpRAG warmup step at 3B shapes (k = 10 passages
# of 128 tokens, 256 + 32 prompt/response tokens), with the levers as variants (remat policy, cuDNN flash
# attention: the library's path and the causal prototype, chunked cross-entropy, batch, donation), MFU per
# variant against the bf16 dense spec peak and a measured 8192^3 bf16 matmul.
#
#   bash benchmarks/gpu_run.sh                      # on the GPU machine: results in $OUT (else ./bench_out)
#   bash benchmarks/gpu_run.sh --dry-run            # the same plumbing on a CPU: tiny model, 1 step per variant
#   bash benchmarks/gpu_run.sh [--dry-run] --variants "plain:B=4,T=2048,remat=full,attn=xla;warmup:B=4"
#
# Needs only jax/flax/optax/numpy and imprag_jax.model / imprag_jax.train (checked first: the GPU machine has no
# ml-collections, grain, gguf, bm25s, scann or tensorflow-datasets).  Variants run in priority order; one that
# would overrun the budget is skipped, an OOM or an unsupported cuDNN shape is reported and the suite goes on,
# and the JSON is rewritten after every variant, so a cut-off run still leaves its numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${BUDGET_S:-400}"        # the Python suite stops starting variants past this
HARD_S="${HARD_S:-470}"            # and is killed here
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY=1; else ARGS+=("$a"); fi
done

echo "== imports (only jax/flax/optax/numpy + imprag_jax.model/train may load)"
"$PY" - <<'PYEOF' || exit 3
import sys
import jax, flax, optax, numpy
import imprag_jax.model, imprag_jax.train.step, imprag_jax.train.state, imprag_jax.train.losses  # noqa: F401
sys.path.insert(0, "benchmarks")
import train_step  # noqa: F401
bad = sorted(m for m in ("ml_collections", "grain", "gguf", "bm25s", "scann", "tensorflow_datasets", "tensorflow")
           if m in sys.modules)
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"backend {jax.default_backend()}, devices {jax.devices()}")
if bad:
    print("EAGER IMPORT of packages the GPU machine lacks or the benchmark must not need:", bad)
    sys.exit(1)
print("imports OK")
PYEOF

if [[ $DRY == 1 ]]; then
  echo "== dry run (tiny model, CPU)"
  JAX_PLATFORMS=cpu "$PY" benchmarks/train_step.py --suite gpu --dry-run --json "$OUT_DIR/gpu_dry_run.json" \
    "${ARGS[@]}"
  exit $?
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "== train-step levers (budget ${BUDGET_S}s)"
timeout -k 10 "$HARD_S" "$PY" benchmarks/train_step.py --suite gpu --shape llama3_3b --budget-s "$BUDGET_S" \
  --json "$OUT_DIR/gpu_train_step.json" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/gpu_train_step.log"
rc=${PIPESTATUS[0]}
echo "== exit $rc; results: $OUT_DIR/gpu_train_step.json"
exit $rc
