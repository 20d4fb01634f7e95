#!/usr/bin/env bash
# Several nodes: run this same command once on every node (srun, pdsh, or by hand).
#
#   NNODES=4 MASTER_ADDR=node001 examples/launch/train_multi_node.sh CONFIG.yaml [section.key=value ...]
#
# torchrun's c10d rendezvous (hosted by the agent on MASTER_ADDR) forms the world, so no node needs
# to know its rank; if a process fails, every node restarts its workers, up to MAX_RESTARTS times,
# and training resumes from the newest complete checkpoint (checkpoint.save_dir).
#
# Environment: NNODES (required), MASTER_ADDR (required: a host every node reaches), MASTER_PORT
# (29500), NPROC_PER_NODE (default: the GPUs nvidia-smi lists), RDZV_ID (a job id shared by the
# nodes; default: SLURM_JOB_ID or "andromeda"), MAX_RESTARTS (3), TORCHRUN (default: the venv's
# torchrun, see find_python.sh). ANDROMEDA_DRY_RUN=1 prints the command, one argument per line,
# instead of running it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: NNODES=N MASTER_ADDR=HOST $0 CONFIG.yaml [section.key=value ...]" >&2
    exit 2
fi
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (the rendezvous endpoint)}"
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
    --nnodes "$NNODES"
    --nproc-per-node "$NPROC_PER_NODE"
    --rdzv-backend c10d
    --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
    --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-andromeda}}"
    --max-restarts "${MAX_RESTARTS:-3}"
    -m megatron_andromeda.train
    --config "$CONFIG"
    "$@"
)
if [[ -n "${ANDROMEDA_DRY_RUN:-}" ]]; then
    printf '%s\n' "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
