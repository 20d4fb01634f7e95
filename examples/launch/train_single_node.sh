#!/usr/bin/env bash
# One node, one process per GPU, through torchrun.
#
#   examples/launch/train_single_node.sh examples/configs/andromeda_100m.yaml [section.key=value ...]
#
# Environment: NPROC_PER_NODE (default: the GPUs nvidia-smi lists, else 1), MASTER_PORT (default
# 29500), TORCHRUN (default: the venv's torchrun, see find_python.sh). ANDROMEDA_DRY_RUN=1 prints
# the command, one argument per line, instead of running it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [[ -z "${ANDROMEDA_DRY_RUN:-}" && ! -f "$CONFIG" ]]; then
    echo "$0: config file $CONFIG does not exist" >&2
    exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi

source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"  # this checkout's torchrun, not PATH's
cmd=(
    "${TORCHRUN_CMD[@]}"
    --standalone
    --nnodes 1
    --nproc-per-node "$NPROC_PER_NODE"
    --master-port "${MASTER_PORT:-29500}"
    -m megatron_andromeda.train
    --config "$CONFIG"
    "$@"
)
if [[ -n "${ANDROMEDA_DRY_RUN:-}" ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
