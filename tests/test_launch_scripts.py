"""The launch scripts in examples/launch/: syntax, the torchrun commands they build, their layouts.

Each script prints its command, one argument per line, when ANDROMEDA_DRY_RUN=1; the flags are then
parsed by torchrun's own argument parser and the training arguments by megatron_andromeda.train's,
and the layouts are validated as a launch of that size would validate them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from megatron_andromeda.config import load_config
from megatron_andromeda.parallel import plan_layout, validate_layout
from megatron_andromeda.planner import Cluster, Layout, evaluate
from megatron_andromeda.train import parse_args as train_parse_args

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), ROOT / "benchmarks" / "gpu_check.sh"])
SBATCH = {  # script -> the config's global batch
    "slurm_andromeda_100m.sbatch": 256,
    "slurm_andromeda_500m.sbatch": 512,
    "slurm_andromeda_1b.sbatch": 1024,
    "slurm_mpt_7b.sbatch": 1024,  # full sharding (FSDP2), HSDP across nodes
}


def run_script(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "MASTER_"))}
    full_env.update(ANDROMEDA_DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{full_env['PATH']}", **env)
    return subprocess.run(
        ["bash", str(script), *args], cwd=ROOT, env=full_env, capture_output=True, text=True
    )


def torchrun_args(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert args.module and args.training_script == "megatron_andromeda.train"
    return args, train_parse_args(args.training_script_args)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_single_node_command():
    result = run_script(
        LAUNCH / "train_single_node.sh",
        "examples/configs/andromeda_100m.yaml",
        "train.steps=10",
        NPROC_PER_NODE="8",
    )
    args, train = torchrun_args(result)
    assert args.standalone and (args.nnodes, args.nproc_per_node) == ("1", "8")
    assert train.config == "examples/configs/andromeda_100m.yaml" and train.overrides == ["train.steps=10"]


def test_multi_node_command():
    result = run_script(
        LAUNCH / "train_multi_node.sh",
        "examples/configs/andromeda_1b.yaml",
        "parallel.tensor=2",
        NNODES="4",
        NPROC_PER_NODE="8",
        MASTER_ADDR="node007",
        MASTER_PORT="29511",
        RDZV_ID="job42",
        MAX_RESTARTS="5",
    )
    args, train = torchrun_args(result)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("4", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("node007:29511", "job42", 5)
    assert not args.standalone
    assert train.overrides == ["parallel.tensor=2"]


def test_multi_node_needs_the_rendezvous_host():
    result = run_script(LAUNCH / "train_multi_node.sh", "examples/configs/andromeda_1b.yaml", NNODES="2")
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr


@pytest.mark.parametrize("nodes", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_layouts_are_valid_and_fit(name, nodes):
    script = LAUNCH / name
    result = run_script(
        script,
        "train.steps=5",
        SLURM_NNODES=str(nodes),
        SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="123",
        MASTER_ADDR="node001",
    )
    args, train = torchrun_args(result)
    assert (args.nnodes, args.nproc_per_node, args.max_restarts) == (str(nodes), "8", 3)
    assert (args.rdzv_endpoint, args.rdzv_id) == ("node001:29500", "123")
    assert train.overrides[-1] == "train.steps=5"  # the user's overrides come last and win
    run = load_config(train.config, train.overrides)
    layout = plan_layout(run, nodes * 8)
    mbs = run.train.micro_batch_size
    assert run.train.global_batch_size == SBATCH[name] and SBATCH[name] % (mbs * layout.dp) == 0
    plan = evaluate(
        run.model,
        Layout(
            layout.tp,
            layout.pp,
            layout.dp,
            mbs,
            run.parallel.sequence_parallel,
            layout.distributed_optimizer,
            run.parallel.recompute,
            full_sharding=layout.fully_sharded,
            data_replicas=layout.data_replicas,
        ),
        Cluster(nodes=nodes),
        seq_length=run.data.seq_length,
        global_batch=SBATCH[name],
    )
    assert plan.fits, plan.memory.as_gib()
    if name == "slurm_mpt_7b.sbatch":  # without full sharding the 7B model needs model parallelism
        assert layout.fully_sharded and layout.tp == layout.pp == 1
        assert layout.data_replicas == nodes  # HSDP: one replica per node, shards within a node


def test_sbatch_without_a_layout_says_what_to_do():
    result = run_script(LAUNCH / "slurm_andromeda_1b.sbatch", SLURM_NNODES="3", MASTER_ADDR="node001")
    assert result.returncode == 2
    assert "no layout for 3 nodes" in result.stderr and "PLAN_GPU" in result.stderr


def test_sbatch_asks_the_planner_for_other_gpus():
    result = run_script(
        LAUNCH / "slurm_andromeda_500m.sbatch",
        SLURM_NNODES="3",
        SLURM_GPUS_ON_NODE="4",
        MASTER_ADDR="node001",
        PLAN_GPU="a100-40gb",
    )
    args, train = torchrun_args(result)
    assert (args.nnodes, args.nproc_per_node) == ("3", "4")
    run = load_config(train.config, train.overrides)
    validate_layout(run.parallel, run.model, 12, run.data.seq_length)
    assert any(o.startswith("train.micro_batch_size=") for o in train.overrides)
