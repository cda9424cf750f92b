#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, each driving the node's GPUs; the coordinator is the
# first host of the allocation. Run from the repository root on a shared filesystem (code, venv, WORKDIR).
# Tested against stub scontrol/srun commands and, for the multi-process code path, with 2 local CPU processes
# (tests/test_multiprocess.py); not run on a real cluster. Details: docs/scaling.md, "On a real pod, step by step".
#
# 1. Install once on the shared filesystem (the README's command plus a CUDA JAX):
#      python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[data]" "jax[cuda12]"
#    (or INSTALL=1 below: pip install -e '.[data]' on every node before training)
# 2. Data and pretrained weights on the shared filesystem: data.prepare --out /shared/data/kilt, the HF checkpoint
#    directory at /shared/models/Llama-3.1-8B.
# 3. Allocate and start (sbatch; or `bash` in its place inside `salloc --nodes=2 --ntasks-per-node=1 ...`):
#      mkdir -p logs && WORKDIR=/shared/runs/llama3_8b sbatch --nodes=2 launch/gpu_slurm.sh configs/llama3_1_8b.py:gpu8 \
#          --config.mesh.data=2 --config.model.init=/shared/models/Llama-3.1-8B \
#          --config.data.kind=prepared --config.data.dir=/shared/data/kilt
#    The config's mesh must cover every GPU of the job (gpu8 = one node of 8; for 2 nodes --config.mesh.data=2); a
#    mismatch stops the run with "did you start every host?".
# 4. Each node runs `python -m imprag_jax.train --distributed --config CONFIG --workdir WORKDIR [overrides]` with
#    IMPRAG_COORDINATOR=<first node>:${COORD_PORT:-12355}, IMPRAG_NUM_PROCESSES=$SLURM_NTASKS and
#    IMPRAG_PROCESS_ID=$SLURM_PROCID (read by imprag_jax/train/distributed.py). Logs: logs/slurm-<job>-task<rank>.log.
# 5. Checkpoints: $WORKDIR/checkpoints/<step> (orbax, all nodes together); metrics.jsonl, tb/ and eval/ from process 0.
#    SIGTERM 5 minutes before the time limit (--signal below) makes the trainer save and stop.
# 6. Resume: submit the same line again with the same WORKDIR (e.g. sbatch --dependency=afterany:<job> ...).
# 7. Evaluate: the end-of-training evaluation runs on every node (index sharded over the job's GPUs) and writes
#    $WORKDIR/eval/final.json|md. To evaluate again on every node, ENTRY=evaluate runs `python -m imprag_jax.evaluate
#    --distributed --config CONFIG --workdir WORKDIR [flags]` instead of the trainer, e.g.
#      WORKDIR=/shared/runs/llama3_8b ENTRY=evaluate sbatch --nodes=2 launch/gpu_slurm.sh configs/llama3_1_8b.py:gpu8 \
#          --config.mesh.data=2 [same --config.* as training] --tasks=nq,squad --modes=imprag,recall --k=1,5
#    (index sharded over the nodes, each encoding its rows; process 0 writes $WORKDIR/eval/report.*; --kv_store and
#    --backend scann are single-process). Alternatively rerun training on the finished WORKDIR with --config.eval.*
#    overrides (no step left: restore + evaluation only).
#SBATCH --job-name=imprag_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=logs/slurm-%j.out
#SBATCH --signal=TERM@300
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: WORKDIR=/shared/run sbatch [--nodes=N] $0 CONFIG[:arg] [--config.key=value ...]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?run this script with sbatch (or inside salloc)}"
: "${WORKDIR:?set WORKDIR to a directory every node sees}"
CONFIG=$1; shift
ENTRY=${ENTRY:-train}
[[ "$ENTRY" == train || "$ENTRY" == evaluate ]] || { echo "ENTRY must be train or evaluate, got '$ENTRY'" >&2; exit 2; }
mkdir -p "${LOG_DIR:-logs}"
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST"); COORD=${HOSTS%%$'\n'*}  # first host of the job
export IMPRAG_COORDINATOR="$COORD:${COORD_PORT:-12355}"
export IMPRAG_NUM_PROCESSES="$SLURM_NTASKS"
echo "[gpu_slurm] job $SLURM_JOB_ID: $SLURM_NTASKS processes on $SLURM_JOB_NODELIST, coordinator $IMPRAG_COORDINATOR"
[[ "${INSTALL:-0}" == 1 ]] && srun --ntasks-per-node=1 pip install -q -e '.[data]'
# %t = the task's rank: one log per node; IMPRAG_PROCESS_ID is each task's own SLURM_PROCID
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="${LOG_DIR:-logs}/slurm-%j-task%t.log" \
  bash -c 'export IMPRAG_PROCESS_ID=$SLURM_PROCID; exec python -m "imprag_jax.$0" --distributed --config "$1" --workdir "$2" "${@:3}"' \
  "$ENTRY" "$CONFIG" "$WORKDIR" "$@"
