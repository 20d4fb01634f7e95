"""An orderly end of a run: every thread it started is stopped before the process groups go, exits clean.

Issue 21: one rank of an 8-process run (tensor 2 x pipeline 2 x data 2) printed `terminate called
without an active exception` after its last step. The cause: the pipeline watchdog's daemon thread
polls the job's store; when the interpreter exits while a poll is in flight, Python kills the
thread as the store call re-takes the GIL (pthread_exit inside pybind11's `gil_scoped_release`,
whose destructor is noexcept), and C++ aborts the process. Nothing stopped that thread.

The first test makes that meeting certain (a watchdog polling without pause) and needs the thread
joined before exit; the second checks ParallelContext.close stops the schedule's watchdog before
it destroys the groups; the third launches the documented 8-process run a few times. Timeouts are
hang guards only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import FOX, train_tiny_tokenizer, write_random_documents

from megatron_andromeda.config import load_config
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.pipeline import build_pipeline_schedule
from megatron_andromeda.parallel.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]

UNCLOSED_WATCHDOG = """
import torch.distributed as dist
from megatron_andromeda.parallel.watchdog import Watchdog

store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
watchdog = Watchdog(600.0, store=store)
watchdog.poll_s = 0.0  # poll the store without pause: exit always meets a poll in flight
with watchdog.watch("a wait that returns at once"):
    pass
print("leaving without closing the watchdog", flush=True)
"""


def test_a_watchdog_left_running_is_joined_before_the_interpreter_exits():
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", UNCLOSED_WATCHDOG], cwd=ROOT, capture_output=True, text=True,
            timeout=HANG_GUARD_S,
        )  # fmt: skip
        assert "leaving" in result.stdout, result.stderr[-2000:]
        assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-2000:]


def _watchdog_threads_around_close() -> tuple[bool, bool, bool]:
    """On each of 2 pipeline ranks: (watchdog running before close, running after, groups left)."""
    cfg = load_config(None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.vocab_size=256",
        "model.max_seq_length=16", "data.seq_length=16", "parallel.pipeline=2",
        "train.micro_batch_size=1", "train.global_batch_size=2",
    ])  # fmt: skip
    ctx = ParallelContext.build(plan_layout(cfg, 2))
    schedule = build_pipeline_schedule(ctx, cfg.model, cfg.data.seq_length, torch.float32)
    watchdog = schedule.keywords["comm"].watchdog
    with watchdog.watch("a wait that returns at once"):
        pass
    running = lambda: any(t.name == "andromeda-watchdog" and t.is_alive() for t in threading.enumerate())  # noqa: E731
    before = running()
    ctx.close()
    import torch.distributed as dist

    return before, running(), dist.is_initialized()


def test_closing_the_context_stops_the_pipeline_watchdog_then_destroys_the_groups():
    assert run_distributed(_watchdog_threads_around_close, world_size=2) == [(True, False, False)] * 2


# --------------------------------------------------------------------------------------------- 8 processes
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:

    root = tmp_path_factory.mktemp("shutdown")
    tok = train_tiny_tokenizer(root / "tokenizer.json", [FOX] * 20, special_tokens=["<|endoftext|>"])
    write_random_documents(root / "train_text_document", 40, 1, load_tokenizer(tok).vocab_size)
    return root


def test_the_8_process_run_exits_cleanly_every_time(workspace, tmp_path):
    """tensor 2 x pipeline 2 x data 2 with ZeRO-1 and async saves, three launches: exit 0, no abort."""
    for launch in range(3):
        out = tmp_path / f"launch{launch}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
            "-m", "megatron_andromeda.train",
            f"data.tokenizer={workspace / 'tokenizer.json'}",
            f"data.train=[{workspace / 'train_text_document'}]",
            "data.seq_length=16", "model.vocab_size=384", "model.hidden_size=32", "model.num_layers=2",
            "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_length=16",
            "train.micro_batch_size=1", "train.global_batch_size=4", "train.steps=2",
            "train.eval_interval=0", "train.threads=1", "optim.warmup_steps=1",
            "parallel.tensor=2", "parallel.pipeline=2", "parallel.distributed_optimizer=true",
            f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.save_interval=1", "checkpoint.async_save=true",
            f"logging.run_dir={out / 'run'}", "logging.tensorboard=false", "logging.progress_bar=false",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"launch {launch}: exit {result.returncode}\n{output[-3000:]}"
        assert "terminate called" not in output, f"launch {launch}:\n{output[-3000:]}"
        assert "step      2/2" in result.stdout and (out / "ckpt" / "latest").read_text() == "step_00000002"
