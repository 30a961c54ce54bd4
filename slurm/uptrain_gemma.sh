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
# node, each running torchrun over the node's GPUs with c10d rendezvous on the first node.
# Preemption: slurm sends USR1 300 s before the end; the trainer saves a checkpoint and exits, and
# the job requeues itself; `checkpoint.resume: auto` continues from the latest checkpoint.
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

train=(torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d
       --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
       -m relaxrec_megatron.cli.main train --config "$CONFIG"
       "run.output_dir=$CHECKPOINT_DIR" checkpoint.resume=auto "$@")
run=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${train[@]}")

if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "nodes=$NNODES gpus_per_node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT"
    printf '%q ' "${run[@]}"; echo
    exit 0
fi

requeue() {  # forward the preemption signal to the trainer, wait for its checkpoint, requeue
    echo "[slurm] preemption signal: checkpointing and requeueing job $SLURM_JOB_ID"
    kill -USR1 "$child" 2>/dev/null || true
    wait "$child" || true
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1
cd "$ROOT"
"${run[@]}" &
child=$!
wait "$child"
