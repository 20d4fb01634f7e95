#!/usr/bin/env python3
"""Exit stress: launch the tensor 2 x pipeline 2 x data 2 run many times, count unclean exits.

Issue 21 saw `terminate called without an active exception` on one rank after the last step in 1
of 12 such launches, so torchrun exited non-zero although every logged figure was right. Such a
race needs many launches to show; this script gives the failure count before and after a change.
It is not part of the test suite (one launch takes ~30 s on 2 busy cores; tests/test_shutdown.py
runs 3).

    .venv/bin/python benchmarks/stress_exit.py --launches 20             # the documented command
    .venv/bin/python benchmarks/stress_exit.py --launches 20 --amplify   # the race window widened

A launch fails when torchrun's exit status is not 0 or any output says "terminate called".
`--amplify` runs the workers through this file (as tests/test_checkpoint_restart.py does), which
makes the pipeline watchdog poll the job's store every 10 ms instead of every comm_timeout_s / 10
(at most 5 s): the cause found was that poll meeting interpreter exit in a daemon thread, and
polling more often makes the meeting likely in every launch instead of a few percent of them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(root: Path) -> None:
    """A tiny byte-level BPE tokenizer and one dataset of random documents."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "train_text_document", np.uint16) as writer:
        for _ in range(80):
            writer.add_document(np.append(rng.integers(1, tok.get_vocab_size(), rng.integers(5, 40)), 0))


def overrides(ws: Path, out: Path, steps: int) -> list[str]:
    """Tensor 2 x pipeline 2 x data 2, a tiny model, async saves (the background writer runs too)."""
    return [
        f"data.tokenizer={ws / 'tokenizer.json'}", f"data.train=[{ws / 'train_text_document'}]",
        "data.seq_length=16", "model.vocab_size=384", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_length=16",
        "train.micro_batch_size=1", "train.global_batch_size=4", f"train.steps={steps}",
        "train.eval_interval=0", "train.threads=1", "optim.warmup_steps=1",
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.distributed_optimizer=true",
        f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.save_interval=2", "checkpoint.async_save=true",
        f"logging.run_dir={out / 'run'}", "logging.log_interval=1", "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]  # fmt: skip


def launch(ws: Path, out: Path, steps: int, amplify: bool, timeout_s: float) -> tuple[bool, str, float]:
    """One 8-process launch: (clean, why not, seconds)."""
    target = [str(Path(__file__)), "--worker"] if amplify else ["-m", "megatron_andromeda.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
           *target, *overrides(ws, out, steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return False, f"hung for {timeout_s:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if "terminate called" in output:
        line = next(x for x in output.splitlines() if "terminate called" in x)
        return False, f"exit {result.returncode}: {line.strip()}", seconds
    if result.returncode != 0:
        return False, f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}", seconds
    return True, "", seconds


def worker(argv: list[str]) -> None:
    """Run by torchrun with --amplify: the training entry point with a fast-polling watchdog."""
    from megatron_andromeda import train
    from megatron_andromeda.parallel.pipeline import watchdog

    original = watchdog.Watchdog.__init__

    def polling_fast(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.poll_s = 0.01

    watchdog.Watchdog.__init__ = polling_fast
    train.main(argv)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--amplify", action="store_true", help="poll the store every 10 ms (see above)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="a launch taking longer counts as hung")
    args = p.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="stress-exit-") as tmp:
        ws = Path(tmp)
        make_workspace(ws)
        for i in range(1, args.launches + 1):
            out = ws / f"launch{i}"
            clean, why, seconds = launch(ws, out, args.steps, args.amplify, args.timeout_s)
            failures += not clean
            print(f"launch {i:3d}: {'ok    ' if clean else 'FAILED'} {seconds:5.1f} s {why}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    print(f"failed launches: {failures}/{args.launches} (amplify={args.amplify}); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
