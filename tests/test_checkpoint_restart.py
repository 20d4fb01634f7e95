"""Restarts under torchrun: a worker killed mid-run resumes from the latest complete checkpoint.

Two gloo processes (data 2 with the distributed optimizer, dropout on, async saves every 2 steps)
train 8 steps through `megatron_andromeda.train`. In the interrupted run rank 1 calls os._exit
after step 5, once (a marker file remembers it); `torchrun --max-restarts 1` restarts both
workers, which resume from the newest complete checkpoint. Every step's final loss must equal the
uninterrupted run's, bitwise.

Run as a script (by torchrun), this file is the worker: it installs the one-time crash and then
hands its arguments to `megatron_andromeda.train.main`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import FOX, train_tiny_tokenizer, write_random_documents

from megatron_andromeda.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer and one dataset of random documents."""

    root = tmp_path_factory.mktemp("restart")
    tok = train_tiny_tokenizer(root / "tokenizer.json", [FOX] * 20, special_tokens=["<|endoftext|>"])
    vocab = load_tokenizer(tok).vocab_size  # ids the tokenizer knows: others would be masked out of the loss
    write_random_documents(root / "train_text_document", 80, 1, vocab)
    return root


def overrides(ws: Path, out: Path) -> list[str]:
    return [
        f"data.tokenizer={ws / 'tokenizer.json'}", f"data.train=[{ws / 'train_text_document'}]",
        "data.seq_length=16", "model.vocab_size=384", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", "model.max_seq_length=16", "model.dropout=0.1", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.steps=8", "train.eval_interval=0", "train.threads=1",
        "optim.warmup_steps=1", "parallel.data=2", "parallel.distributed_optimizer=true",
        f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.save_interval=2", "checkpoint.async_save=true",
        f"logging.run_dir={out / 'run'}", "logging.log_interval=1", "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]  # fmt: skip


def torchrun(ws: Path, out: Path, die_at: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", str(Path(__file__)),
           f"--die-at={die_at}", f"--marker={out / 'died'}", *overrides(ws, out)]  # fmt: skip
    # torchrun keeps its store across restarts: init_parallel's restart_safe_store must cope with it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)


def step_losses(run_dir: Path) -> tuple[dict[int, float], int]:
    """The last logged loss of each step, and how many train records there were."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {r["step"]: r["loss"] for r in train}, len(train)


def test_a_worker_killed_mid_run_restarts_and_ends_with_the_same_losses(workspace, tmp_path):
    plain = torchrun(workspace, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    crashed = torchrun(workspace, tmp_path / "crashed", die_at=5)
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert (tmp_path / "crashed" / "died").exists(), "the worker never crashed: the test proves nothing"
    assert "resumed from" in crashed.stdout
    expected, _ = step_losses(tmp_path / "plain" / "run")
    got, records = step_losses(tmp_path / "crashed" / "run")
    assert sorted(got) == list(range(1, 9)) and records > 8  # some steps ran twice
    assert got == expected
    latest = (tmp_path / "crashed" / "ckpt" / "latest").read_text()
    assert latest == "step_00000008"


# --------------------------------------------------------------------------------------------- the worker
def _worker(argv: list[str]) -> None:
    from megatron_andromeda import train
    from megatron_andromeda.training.trainer import Trainer

    die_at = int(argv[0].split("=", 1)[1])
    marker = Path(argv[1].split("=", 1)[1])
    step = Trainer.train_step

    def train_step_that_dies_once(self: Trainer) -> dict[str, float]:
        metrics = step(self)
        if self.state.step == die_at and os.environ["RANK"] == "1" and not marker.exists():
            marker.write_text("rank 1 died here once\n")
            os._exit(17)
        return metrics

    Trainer.train_step = train_step_that_dies_once
    train.main(argv[2:])


if __name__ == "__main__":
    _worker(sys.argv[1:])
