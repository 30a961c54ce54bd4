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
#SBATCH --open-mode=append
#
# Uptrain relaxed recursive Gemma 2B (configs/gemma-2b-relaxed.yaml) on SLURM: one srun task per
# node, each running launch/torchrun.sh over the node's GPUs with c10d rendezvous on the first node.
#
#   sbatch slurm/uptrain_gemma.sh [dotted.key=value ...]         (from the checkout: logs/ is there)
#   sbatch --nodes=2 --time=4:00:00 slurm/uptrain_gemma.sh ...   (sbatch's options override the above)
#   CONFIG=configs/other.yaml CHECKPOINT_DIR=runs/other sbatch slurm/uptrain_gemma.sh
#   DRY_RUN=1 bash slurm/uptrain_gemma.sh      # print the commands (outside SLURM: fake SLURM_* vars)
#
# Preemption and the time limit: `--signal=B:USR1@300` sends USR1 to this script 300 s before the
# end, and `scancel --signal=USR1 --batch JOB` does so at any time. The script forwards it through
# srun, which signals every process of the step: the ranks finish the step (or the save in flight),
# save a checkpoint together and exit 75 (training.stops), and the script requeues the job;
# `checkpoint.resume=auto` continues from that checkpoint. The 300 s lead covers torchrun's
# STOP_TIMEOUT (240 s: the step in flight plus a Gemma-2B checkpoint) and leaves a minute for the
# requeue. SLURM holds a requeued job for its credential lifetime (AuthInfo cred_expire, 120 s by
# default) before it can start again. Every attempt appends to the same log (--open-mode=append),
# starting with an "[slurm] attempt N" line.
#
# A dead or stalled worker: torchrun restarts every worker of the node up to MAX_RESTARTS times
# (default 3 here), each time resuming from the latest checkpoint.
set -euo pipefail
# a stop signal can come at any time, SLURM's time-limit notice even before this script got far:
# noted from the first line, forwarded to srun once it runs
child="" pending=""
forward() {  # srun passes it on to every process of the step
    if [ -n "$child" ]; then kill -"$1" "$child" 2>/dev/null || true; else pending="$1"; fi
}
trap 'echo "[slurm] USR1: stopping job ${SLURM_JOB_ID:-} at the end of the step"; forward USR1' USR1
trap 'echo "[slurm] TERM: stopping job ${SLURM_JOB_ID:-} at the end of the step"; forward TERM' TERM

# The checkout: slurmd runs a copy of this script from its spool folder, so its own path may say
# nothing; then the script sbatch was given (scontrol's Command=), else the submit folder.
ROOT="${RELAXREC_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[ -f "$ROOT/launch/python_env.sh" ] || ROOT="$(dirname "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2- || true)")")"
[ -f "$ROOT/launch/python_env.sh" ] || ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
[ -f "$ROOT/launch/python_env.sh" ] || { echo "uptrain_gemma.sh: cannot find the relaxrec checkout; submit from it or set RELAXREC_ROOT" >&2; exit 2; }
CONFIG="${CONFIG:-$ROOT/configs/gemma-2b-relaxed.yaml}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$ROOT/runs/gemma-2b-relaxed-r512}"

: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (or set SLURM_* and DRY_RUN=1)}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}"
[ "${DRY_RUN:-0}" = 1 ] || echo "[slurm] job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date '+%F %T')"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
GPUS="${GPUS##*:}"  # "gpu:8" -> 8
if [ -n "$GPUS" ] && [ "$GPUS" != 0 ]; then
    export NPROC_PER_NODE="$GPUS"
fi  # else launch/torchrun.sh's own choice (the visible GPUs, or 2 processes on a CPU node)
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
CPUS="${SLURM_CPUS_PER_TASK:-}"

export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
procs="${NPROC_PER_NODE:-2}"
threads=$(( ${CPUS:-$((8 * procs))} / procs ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"  # the task's CPUs over its processes

export NNODES MASTER_ADDR MASTER_PORT
export RDZV_ID="$SLURM_JOB_ID" STOP_TIMEOUT="${STOP_TIMEOUT:-240}" MAX_RESTARTS="${MAX_RESTARTS:-3}"
train=(bash "$ROOT/launch/torchrun.sh" "$CONFIG" "run.output_dir=$CHECKPOINT_DIR" checkpoint.resume=auto "$@")
# srun does not pass --cpus-per-task on from sbatch (SLURM 22.05 and later): without it, a node's
# processes would share one core
run=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${CPUS:+--cpus-per-task="$CPUS"} "${train[@]}")

if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "nodes=$NNODES gpus_per_node=${NPROC_PER_NODE:-auto} master=$MASTER_ADDR:$MASTER_PORT"
    printf '%q ' "${run[@]}"; echo
    DRY_RUN=1 "${train[@]}"
    exit 0
fi

cd "$ROOT"
"${run[@]}" &
child=$!
[ -z "$pending" ] || forward "$pending"
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
echo "[slurm] job $SLURM_JOB_ID ended with status $rc"
exit "$rc"
