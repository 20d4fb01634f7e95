"""The launch scripts in examples/launch/: syntax, the torchrun commands they build, their layouts.

Each script prints its command, one argument per line, when ANDROMEDA_DRY_RUN=1; the flags are then
parsed by torchrun's own argument parser and the training arguments by megatron_andromeda.train's,
and the layouts are validated as a launch of that size would validate them. The scripts find the
torchrun that `make install` put in the checkout's .venv (or the active venv's, TORCHRUN, or
`python -m torch.distributed.run`) rather than a bare `torchrun`, which a fresh shell does not have
(issue 20 item 4); one test launches for real from such a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
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


def split_launcher(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the torchrun program: a torchrun path or `PYTHON -m torch.distributed.run`, its arguments)."""
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        return argv[:3], argv[3:]
    assert Path(argv[0]).name == "torchrun", argv[:3]
    return argv[:1], argv[1:]


def torchrun_args(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    launcher, argv = split_launcher(result.stdout.splitlines())
    assert launcher != ["torchrun"], "a bare torchrun is not on PATH after `make install`"
    args = get_args_parser().parse_args(argv)
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


# ------------------------------------------------------------------ Slurm directives and the dedup arrays
def _slurm_time(value: str) -> str:
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", value):
        raise ValueError(value)
    return value


def _slurm_mem(value: str) -> str:
    if not re.fullmatch(r"\d+[KMGT]?", value):
        raise ValueError(value)
    return value


def _slurm_array(value: str) -> str:
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*(%\d+)?", value):
        raise ValueError(value)
    return value


def sbatch_parser() -> argparse.ArgumentParser:
    """The sbatch options our scripts use, with sbatch's value formats."""
    p = argparse.ArgumentParser(prog="sbatch", exit_on_error=False)
    for name in ("--nodes", "--ntasks", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task"):
        p.add_argument(name, type=int)
    for name in ("--job-name", "--output", "--export", "--partition", "--account"):
        p.add_argument(name)
    p.add_argument("--time", type=_slurm_time)
    p.add_argument("--mem", type=_slurm_mem)
    p.add_argument("--array", type=_slurm_array)
    p.add_argument("--dependency", type=lambda v: re.fullmatch(r"afterok:[\w-]+(:[\w-]+)*", v).group(0))
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--parsable", action="store_true")
    p.add_argument("script", nargs="?")
    return p


def parse_sbatch(argv: list[str]) -> argparse.Namespace:
    args, unknown = sbatch_parser().parse_known_args(argv)
    assert not unknown, f"unknown sbatch options {unknown}"
    return args


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_directives_parse(script):
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert directives and not any(line.startswith("#SBATCH") for line in lines[first_command:])
    args = parse_sbatch(directives)  # Slurm reads directives up to the first command only
    assert args.job_name and args.time and args.output


def test_dedup_sbatch_submits_chained_arrays_that_run_the_stages(tmp_path):
    from megatron_andromeda.preprocess.neardup.cli import build_parser

    inputs = []
    for p in range(3):
        inputs.append(tmp_path / f"in{p}.jsonl")
        texts = [f"document {p}-{i} of three, " * 30 for i in range(5)]
        texts[4] = texts[0] if p == 2 else texts[4]  # in2.jsonl:5 repeats in2.jsonl:1
        inputs[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    work = str(tmp_path / "nd")
    env = dict(WORK_DIR=work, INPUT=str(tmp_path / "in*.jsonl"), PYTHON=sys.executable, MAX_ARRAY="3",
               NEARDUP_ARGS="--no-clean --bands 4 --rows 32")  # fmt: skip
    result = run_script(LAUNCH / "dedup.sbatch", **env)
    assert result.returncode == 0, result.stderr
    submitted = [shlex.split(line)[1:] for line in result.stderr.splitlines() if line.startswith("sbatch ")]
    jobs = [parse_sbatch(argv) for argv in submitted]
    assert [j.array for j in jobs] == ["0-2", "0-2", "0-0"]  # 3 inputs; 4 bands in arrays of <= 3; 1
    assert [j.dependency for j in jobs] == [None, "afterok:dry-signatures", "afterok:dry-buckets"]
    assert all(j.script == "examples/launch/dedup.sbatch" and j.parsable for j in jobs)
    for job in jobs:  # play Slurm: every array task of every stage, in dependency order, for real
        exports = dict(item.split("=", 1) for item in job.export.split(",")[1:])
        first, last = map(int, job.array.split("-"))
        for task in range(first, last + 1):
            printed = run_script(LAUNCH / "dedup.sbatch", **exports, SLURM_ARRAY_TASK_ID=str(task))
            argv = printed.stdout.split()
            args = build_parser().parse_args(argv[2:])
            assert argv[1] == "tools/neardup.py" and (args.task, args.work_dir) == (task, work)
            ran = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "nd" / "clusters" / "report.json").read_text())
    assert report["documents"]["in"] == 15 and report["documents"]["dropped"] == 1
    assert report["sample_clusters"][0]["dropped"] == [f"{inputs[2]}:5"]


def test_dedup_sbatch_needs_a_work_dir():
    result = run_script(LAUNCH / "dedup.sbatch")
    assert result.returncode != 0 and "WORK_DIR" in result.stderr


# ------------------------------------------------------------------------------ which torchrun
@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of examples/launch/ in an otherwise empty checkout (no .venv yet)."""
    shutil.copytree(LAUNCH, tmp_path / "examples" / "launch")
    return tmp_path


def fake_program(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def dry_run_launcher(checkout: Path, **env: str) -> list[str]:
    """The program part of the single-node command, from a shell whose PATH has no torchrun."""
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TORCHRUN", "ANDROMEDA_PYTHON")}
    clean.update(PATH="/usr/bin:/bin", ANDROMEDA_DRY_RUN="1", NPROC_PER_NODE="2", **env)
    script = checkout / "examples" / "launch" / "train_single_node.sh"
    result = subprocess.run(["bash", str(script), "c.yaml"], env=clean, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    launcher, args = split_launcher(result.stdout.splitlines())
    assert args[:2] == ["--standalone", "--nnodes"]
    return launcher


def test_the_checkouts_venv_torchrun_is_found_without_activating_it(checkout):
    assert shutil.which("torchrun", path="/usr/bin:/bin") is None  # what a fresh shell has
    python = dry_run_launcher(checkout)  # no venv at all: torchrun is `python -m torch.distributed.run`
    assert python[1:] == ["-m", "torch.distributed.run"] and "python" in Path(python[0]).name

    venv_torchrun = fake_program(checkout / ".venv" / "bin" / "torchrun")  # what `make install` makes
    assert dry_run_launcher(checkout) == [str(venv_torchrun)]

    active = fake_program(checkout / "other-env" / "bin" / "torchrun")  # an activated venv wins
    assert dry_run_launcher(checkout, VIRTUAL_ENV=str(active.parents[1])) == [str(active)]

    chosen = dry_run_launcher(checkout, TORCHRUN="/opt/py/bin/python -m torch.distributed.run")
    assert chosen == ["/opt/py/bin/python", "-m", "torch.distributed.run"]
    assert dry_run_launcher(checkout, ANDROMEDA_PYTHON="/opt/py/bin/python") == chosen


def test_sbatch_plans_with_the_venvs_python(checkout):
    """slurm_launch.sh runs tools/plan_parallel.py with the venv's Python, not PATH's `python`."""
    python = fake_program(checkout / ".venv" / "bin" / "python")
    python.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/called"; echo train.micro_batch_size=1\n')
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TORCHRUN", "ANDROMEDA_PYTHON")}
    env.update(PATH="/usr/bin:/bin", ANDROMEDA_DRY_RUN="1", SLURM_NNODES="3", MASTER_ADDR="n1",
               PLAN_GPU="h100", SLURM_SUBMIT_DIR=str(checkout))  # fmt: skip
    script = checkout / "examples" / "launch" / "slurm_andromeda_1b.sbatch"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (python.parent / "called").read_text().startswith("tools/plan_parallel.py --config")
    # no .venv/bin/torchrun in this checkout: the venv's python runs torchrun's module
    assert result.stdout.splitlines()[:3] == [str(python), "-m", "torch.distributed.run"]
    assert "train.micro_batch_size=1" in result.stdout.splitlines()


def test_a_launch_from_a_fresh_shell_runs(tmp_path):
    """For real, one process: from a shell with no venv on PATH the script still starts torchrun,
    which starts the trainer (here printing one config section's help and exiting)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TORCHRUN", "ANDROMEDA_PYTHON", "ANDROMEDA_DRY_RUN")
    }
    env.update(PATH="/usr/bin:/bin", VIRTUAL_ENV=sys.prefix, NPROC_PER_NODE="1", MASTER_PORT="29731")
    cmd = ["bash", str(LAUNCH / "train_single_node.sh"), "examples/configs/demo_tiny.yaml", "--help", "optim"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optim.warmup_steps" in result.stdout and "command not found" not in result.stderr
