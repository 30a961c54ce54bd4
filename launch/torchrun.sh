#!/usr/bin/env bash
# torchrun launcher for `relaxrec train`, single node or multi node (c10d rendezvous from the environment).
#
#   launch/torchrun.sh configs/gemma-2b-relaxed.yaml [dotted.key=value ...]
#
# Environment (defaults for one node): NNODES=1, NPROC_PER_NODE=<GPUs, or 2 on CPU>, NODE_RANK=0,
# MASTER_ADDR=127.0.0.1, MASTER_PORT=29500, RDZV_ID=relaxrec. DRY_RUN=1 prints the command instead.
#
# Failures: MAX_RESTARTS (default 0; slurm/uptrain_gemma.sh sets 3) is how often torchrun restarts
# every worker when one dies or stalls (training.watchdog); the restarted run resumes from its latest
# checkpoint (checkpoint.resume=auto), losing the steps since. Each restart is a new rendezvous round
# with a TCP store of its own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): on the agent's shared store the
# restarted workers would find the keys of the first round and fail to connect.
#
# The Python environment: `python` on PATH if it has relaxrec_megatron, else the checkout's .venv
# (tools/env.sh builds it); otherwise the launcher stops with a line that says how to provide one
# (launch/python_env.sh).
#
# Stopping: SIGTERM or SIGUSR1 (slurm's preemption notice) to this process is forwarded to every
# worker; they finish the step, save a checkpoint together and exit. STOP_TIMEOUT (default 240 s) is
# how long torchrun waits for that before it kills them: a Gemma-2B checkpoint (about 4 GB of
# weights and 12 GB of Adam state over the data-parallel ranks) takes well under a minute on a
# parallel file system, the step in flight a few seconds more. The exit status is then 75
# (EX_TEMPFAIL: relaunch; `checkpoint.resume: auto` continues from that checkpoint).
set -euo pipefail
# a stop signal before the launcher holds it (it does from its first import): a stop like any other
stopped() {
    echo "[launch] stopped by SIG$1 before this attempt saved a checkpoint; relaunch with checkpoint.resume=auto to continue from the last complete one" >&2
    exit 75
}
for sig in TERM INT HUP QUIT USR1; do trap "stopped $sig" "$sig"; done
if [ $# -lt 1 ]; then
    echo "usage: launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then
    echo "launch/torchrun.sh: no such config: $CONFIG" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/python_env.sh"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)
fi
cmd=(python -m relaxrec_megatron.parallel.torchrun
    --nnodes="${NNODES:-1}"
    --nproc-per-node="$NPROC_PER_NODE"
    --node-rank="${NODE_RANK:-0}"
    --rdzv-backend=c10d
    --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-relaxrec}"
    --max-restarts="${MAX_RESTARTS:-0}"
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
    --shutdown-timeout="${STOP_TIMEOUT:-240}"
    -m relaxrec_megatron.cli.main train --config "$CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "python=$(command -v python)"
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
