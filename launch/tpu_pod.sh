#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (e.g. v5p-32 = 4 hosts x 4 chips): sync this checkout to all
# workers, install it, and start the same `python -m imprag_jax.train` on each one (jax.distributed finds its peers).
# Run from your workstation (gcloud configured). Tested against a stub gcloud and, for the multi-process code path,
# with 2 local CPU processes (tests/test_multiprocess.py); not run on a real pod. Details: docs/scaling.md,
# "On a real pod, step by step".
#
# 1. Create the slice: gcloud compute tpus tpu-vm create my-v5p-32 --zone=us-east5-a --accelerator-type=v5p-32 \
#        --version=RUNTIME   (RUNTIME: gcloud compute tpus tpu-vm versions list --zone=us-east5-a)
# 2. Mount one shared directory at the same path on every worker (Filestore/NFS, or a bucket via gcsfuse), e.g.
#    /mnt/shared: WORKDIR must be there (orbax writes one checkpoint from all hosts together; no bare gs:// paths).
# 3. Data and pretrained weights on it: data.prepare --out /mnt/shared/data/kilt, the HF checkpoint directory at
#    /mnt/shared/models/Llama-3.1-8B (e.g. gsutil -m cp -r from a bucket).
# 4. Start:
#      WORKDIR=/mnt/shared/runs/llama3_8b bash launch/tpu_pod.sh my-v5p-32 us-east5-a configs/llama3_1_8b.py:v5p-32 \
#          --config.model.init=/mnt/shared/models/Llama-3.1-8B --config.data.kind=prepared \
#          --config.data.dir=/mnt/shared/data/kilt
#    This copies the checkout to ~/imprag_jax on every worker, installs it (the README's pip install -e '.[data]'
#    plus 'jax[tpu]'), and runs `python -m imprag_jax.train --distributed --config CONFIG --workdir WORKDIR
#    [overrides]` on each worker: jax.distributed.initialize() reads the coordinator, the process count and each
#    host's id from the TPU metadata (no IMPRAG_* variables needed). Logs: logs/<TPU_NAME>/worker<i>.log here.
# 5. Checkpoints: $WORKDIR/checkpoints/<step>; metrics.jsonl, tb/ and eval/ are written by process 0.
# 6. Resume: the same command with the same WORKDIR (SKIP_INSTALL=1 skips pip); after a preemption recreate the
#    slice and remount first.
# 7. Evaluate: the end-of-training evaluation runs on every host (index sharded over the slice) and writes
#    $WORKDIR/eval/final.json|md. To evaluate again on every host, ENTRY=evaluate runs `python -m imprag_jax.evaluate
#    --distributed --config CONFIG --workdir WORKDIR [flags]` instead of the trainer, e.g.
#      WORKDIR=... ENTRY=evaluate SKIP_INSTALL=1 bash launch/tpu_pod.sh my-v5p-32 us-east5-a \
#          configs/llama3_1_8b.py:v5p-32 [same --config.* as training] --tasks=nq,squad --modes=imprag,recall
#    (index sharded over the slice, each host encoding its rows; process 0 writes $WORKDIR/eval/report.*;
#    --kv_store and --backend scann are single-process). Alternatively rerun training on the finished WORKDIR with
#    --config.eval.* overrides (no step left: restore + evaluation only).
# Env: ENTRY (train | evaluate; default train), GCP_PROJECT, NUM_WORKERS (default: read from the TPU),
#      SKIP_INSTALL=1, REMOTE_DIR (~/imprag_jax), LOG_DIR.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: WORKDIR=/shared/run bash $0 TPU_NAME ZONE CONFIG[:arg] [--config.key=value ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; shift 3
ENTRY=${ENTRY:-train}
[[ "$ENTRY" == train || "$ENTRY" == evaluate ]] || { echo "ENTRY must be train or evaluate, got '$ENTRY'" >&2; exit 2; }
: "${WORKDIR:?set WORKDIR to a directory every TPU host sees (shared mount)}"
REMOTE_DIR=${REMOTE_DIR:-imprag_jax}
REPO=$(cd "$(dirname "$0")/.." && pwd)
G=(gcloud compute tpus tpu-vm); F=(--zone="$ZONE" ${GCP_PROJECT:+--project="$GCP_PROJECT"})
N=${NUM_WORKERS:-$("${G[@]}" describe "$TPU" "${F[@]}" --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .)}
LOGS=${LOG_DIR:-$REPO/logs/$TPU}; mkdir -p "$LOGS"
echo "[tpu_pod] $TPU ($ZONE): $N workers, config $CONFIG, workdir $WORKDIR, logs $LOGS"

TAR=$(mktemp /tmp/imprag_jax.XXXXXX.tgz)
tar czf "$TAR" -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs --exclude=logs --exclude='*.egg-info' .
"${G[@]}" scp "$TAR" "$TPU:imprag_jax.tgz" --worker=all "${F[@]}"
rm -f "$TAR"
INSTALL="mkdir -p ~/$REMOTE_DIR && tar xzf ~/imprag_jax.tgz -C ~/$REMOTE_DIR"
[[ "${SKIP_INSTALL:-0}" == 1 ]] || INSTALL+=" && cd ~/$REMOTE_DIR && pip install -q -e '.[data]' 'jax[tpu]'"
"${G[@]}" ssh "$TPU" --worker=all "${F[@]}" --command="$INSTALL"

ARGS=""; (( $# )) && ARGS=$(printf ' %q' "$@")
CMD="cd ~/$REMOTE_DIR && python -m imprag_jax.$ENTRY --distributed --config $(printf %q "$CONFIG") --workdir $(printf %q "$WORKDIR")$ARGS"
pids=()
for ((w = 0; w < N; w++)); do  # one ssh per worker, so every host's output lands in its own log
  "${G[@]}" ssh "$TPU" --worker="$w" "${F[@]}" --command="$CMD" > "$LOGS/worker$w.log" 2>&1 &
  pids+=($!)
done
status=0
for w in "${!pids[@]}"; do wait "${pids[$w]}" || { echo "[tpu_pod] worker $w failed: $LOGS/worker$w.log" >&2; status=1; }; done
tail -n 5 "$LOGS/worker0.log"
exit $status
