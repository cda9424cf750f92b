#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one process per node, each driving the node's GPUs; the coordinator is the
# first host of the allocation. Run from the repository root on a shared filesystem (code, venv, WORKDIR).
#
#   WORKDIR=/shared/runs/llama3_8b sbatch --nodes=2 launch/gpu_slurm.sh configs/llama3_1_8b.py:gpu8 [--config.x=v ...]
#
# The config's mesh must cover every GPU of the job (gpu8 = one node of 8; for 2 nodes pass e.g.
# --config.mesh.data=2); a mismatch stops the run with "did you start every host?".
#SBATCH --job-name=imprag_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=logs/slurm-%j.out
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: WORKDIR=/shared/run sbatch [--nodes=N] $0 CONFIG[:arg] [--config.key=value ...]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?run this script with sbatch (or inside salloc)}"
: "${WORKDIR:?set WORKDIR to a directory every node sees}"
CONFIG=$1; shift
mkdir -p "${LOG_DIR:-logs}"
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST"); COORD=${HOSTS%%$'\n'*}  # first host of the job
export IMPRAG_COORDINATOR="$COORD:${COORD_PORT:-12355}"
export IMPRAG_NUM_PROCESSES="$SLURM_NTASKS"
echo "[gpu_slurm] job $SLURM_JOB_ID: $SLURM_NTASKS processes on $SLURM_JOB_NODELIST, coordinator $IMPRAG_COORDINATOR"
[[ "${INSTALL:-0}" == 1 ]] && srun --ntasks-per-node=1 pip install -q -e '.[data]'
# %t = the task's rank: one log per node; IMPRAG_PROCESS_ID is each task's own SLURM_PROCID
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="${LOG_DIR:-logs}/slurm-%j-task%t.log" \
  bash -c 'export IMPRAG_PROCESS_ID=$SLURM_PROCID; exec python -m imprag_jax.train --distributed --config "$0" --workdir "$1" "${@:2}"' \
  "$CONFIG" "$WORKDIR" "$@"
