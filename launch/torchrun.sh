#!/usr/bin/env bash
# torchrun launcher for `relaxrec train`, single node or multi node (c10d rendezvous from the environment).
#
#   launch/torchrun.sh configs/gemma-2b-relaxed.yaml [dotted.key=value ...]
#
# Environment (defaults for one node): NNODES=1, NPROC_PER_NODE=<GPUs, or 2 on CPU>, NODE_RANK=0,
# MASTER_ADDR=127.0.0.1, MASTER_PORT=29500, RDZV_ID=relaxrec. DRY_RUN=1 prints the command instead.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then
    echo "launch/torchrun.sh: no such config: $CONFIG" >&2
    exit 2
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)
fi
cmd=(torchrun
    --nnodes="${NNODES:-1}"
    --nproc-per-node="$NPROC_PER_NODE"
    --node-rank="${NODE_RANK:-0}"
    --rdzv-backend=c10d
    --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    --rdzv-id="${RDZV_ID:-relaxrec}"
    -m relaxrec_megatron.cli.main train --config "$CONFIG" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
