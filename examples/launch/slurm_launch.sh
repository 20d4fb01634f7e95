# Sourced by the slurm_*.sbatch scripts, which set CONFIG and define `layout_for_nodes N` (printing
# "TENSOR PIPELINE MICRO_BATCH RECOMPUTE [DATA_SHARDING [DATA_REPLICAS]]"; the sharding defaults to
# `optimizer`, ZeRO-1, when there is more than one data rank). Picks the layout for this job's node
# count and starts examples/launch/train_multi_node.sh once per node with srun.
#
# PLAN_GPU=h100|h200|a100-80gb|a100-40gb asks tools/plan_parallel.py for the layout instead of the
# script's table (other GPU types, node counts the table lacks). ANDROMEDA_DRY_RUN=1 prints the
# torchrun command of one node instead of launching.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"  # sbatch runs a copy of the script: paths are relative to the repo root
source examples/launch/find_python.sh  # ANDROMEDA_PYTHON: the venv's python, not PATH's
NODES=${SLURM_NNODES:?run this through sbatch (SLURM_NNODES is unset)}
GPUS=${SLURM_GPUS_ON_NODE:-8}
WORLD=$((NODES * GPUS))

if [[ -n "${PLAN_GPU:-}" ]]; then
    read -r -a LAYOUT < <("$ANDROMEDA_PYTHON" tools/plan_parallel.py --config "$CONFIG" --nodes "$NODES" \
        --gpus-per-node "$GPUS" --gpu "$PLAN_GPU" --print-overrides)
    [[ ${#LAYOUT[@]} -gt 0 ]] || { echo "tools/plan_parallel.py found no layout" >&2; exit 2; }
else
    if ! read -r TP PP MBS RECOMPUTE SHARDING REPLICAS < <(layout_for_nodes "$NODES"); then
        echo "no layout for $NODES nodes in this script's table: use a node count it lists, or set" \
            "PLAN_GPU=h100 (or another GPU type) to have tools/plan_parallel.py choose one" >&2
        exit 2
    fi
    DP=$((WORLD / (TP * PP)))
    bool() { if [[ $1 -gt 1 ]]; then echo true; else echo false; fi; }
    if [[ -z "${SHARDING:-}" ]]; then
        if [[ $DP -gt 1 ]]; then SHARDING=optimizer; else SHARDING=none; fi
    fi
    LAYOUT=(
        "parallel.tensor=$TP" "parallel.pipeline=$PP" "parallel.data=$DP"
        "parallel.sequence_parallel=$(bool "$TP")" "parallel.distributed_optimizer=false"
        "parallel.data_sharding=$SHARDING" "parallel.data_replicas=${REPLICAS:-1}"
        "parallel.recompute=$RECOMPUTE" "train.micro_batch_size=$MBS"
    )
fi

export NNODES=$NODES NPROC_PER_NODE=$GPUS
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-andromeda}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
echo "andromeda: $CONFIG on $NODES x $GPUS GPUs: ${LAYOUT[*]}" >&2

launch=(bash examples/launch/train_multi_node.sh "$CONFIG" "${LAYOUT[@]}" "$@")
if [[ -n "${ANDROMEDA_DRY_RUN:-}" ]]; then
    exec "${launch[@]}"
fi
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${launch[@]}"
