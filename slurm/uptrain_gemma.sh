#!/usr/bin/env bash
#SBATCH --job-name=relaxrec-gemma-2b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
#
# Uptrain relaxed recursive Gemma 2B (configs/gemma-2b-relaxed.yaml) on SLURM: one srun task per
# node, each running launch/torchrun.sh over the node's GPUs with c10d rendezvous on the first node.
# Preemption and the time limit: `--signal=B:USR1@300` sends USR1 to this script 300 s before the
# end. It forwards USR1 through srun to torchrun, which forwards it to every worker; they finish the
# step, save a checkpoint together and exit with status 75, and this script requeues the job;
# `checkpoint.resume: auto` continues from that checkpoint. The 300 s lead covers torchrun's
# STOP_TIMEOUT (240 s, launch/torchrun.sh: the step in flight plus a Gemma-2B checkpoint) and
# leaves a minute for the requeue.
#
#   sbatch slurm/uptrain_gemma.sh [dotted.key=value ...]
#   DRY_RUN=1 bash slurm/uptrain_gemma.sh      # print the commands (outside SLURM: fake SLURM_* vars)
set -euo pipefail
ROOT="${RELAXREC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${CONFIG:-$ROOT/configs/gemma-2b-relaxed.yaml}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$ROOT/runs/gemma-2b-relaxed-r512}"

: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or set SLURM_* and DRY_RUN=1)}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "gpu:8" -> 8
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

export NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT
export NPROC_PER_NODE="$GPUS_PER_NODE" RDZV_ID="$SLURM_JOB_ID" STOP_TIMEOUT="${STOP_TIMEOUT:-240}"
train=(bash "$ROOT/launch/torchrun.sh" "$CONFIG" "run.output_dir=$CHECKPOINT_DIR" checkpoint.resume=auto "$@")
run=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${train[@]}")

if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "nodes=$NNODES gpus_per_node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT"
    printf '%q ' "${run[@]}"; echo
    DRY_RUN=1 "${train[@]}"
    exit 0
fi

forward() { kill -"$1" "$child" 2>/dev/null || true; }  # srun passes it on to each node's torchrun
trap 'echo "[slurm] USR1: stopping job $SLURM_JOB_ID at the end of the step"; forward USR1' USR1
trap 'forward TERM' TERM
cd "$ROOT"
"${run[@]}" &
child=$!
set +e
wait "$child"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupted the wait
    wait "$child"; rc=$?
done
set -e
if [ "$rc" = 75 ]; then
    echo "[slurm] checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
