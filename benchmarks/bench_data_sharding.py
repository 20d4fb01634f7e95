"""Per-rank model state, peak step memory and step time of full sharding (FSDP2) against ZeRO-1.

For each data-parallel degree d, a product trainer (train.build_training, the real Trainer) runs on
d gloo (CPU) processes with `parallel.data_sharding` = optimizer (ZeRO-1) and = full (FSDP2). Each
rank counts, after a real step, the bytes it holds of

- parameters: bf16 weights under ZeRO-1; the fp32 shard (the master itself) under full sharding;
- gradients: the fp32 main-gradient buffer (every rank, whole) under ZeRO-1; the fp32 shard;
- optimizer state: fp32 masters (copies only) and both Adam moments;

The reference is the replicated state, measured in the same run on one process (`data_sharding=none`):
`target` is replicated / d and the check is measured <= 1.1 x target. Beside it, the peak memory
of a step: what the rank holds when the step starts plus the high-water mark of the tensors the
step allocates (activations, gathered weights, gradients, communication buffers), counted by a
dispatch mode that sees every allocation and free. Then the mean step time after warm-up, whose
ratio full / ZeRO-1 is the cost of gathering the weights (and reducing the gradients) for every
micro-batch; on CPU and gloo only its direction carries over to GPUs. `uptime` is printed beside
the times: the machine may be shared.

    .venv/bin/python benchmarks/bench_data_sharding.py                     # bf16, 7.8 M params, d = 2, 4
    .venv/bin/python benchmarks/bench_data_sharding.py --precision fp32 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.models import GPTModel
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.fully_sharded import local_shard
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.train import build_training
from megatron_andromeda.training.trainer import Trainer

MIB = 2**20
MODES = ("optimizer", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation steps per rank")
    p.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    if min(args.degrees) < 1 or min(args.hidden, args.layers, args.vocab, args.seq, args.steps) < 1:
        p.error("--degrees, --hidden, --layers, --vocab, --seq and --steps must be >= 1")
    return args


class RandomTokens:
    """A fixed set of random sequences (no files), as the trainer's dataset."""

    def __init__(self, vocab: int, seq: int, n: int = 512):
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.data[i, :-1], "labels": self.data[i, 1:]}


def run_config(args: argparse.Namespace, degree: int, mode: str, root: Path) -> RunConfig:
    model = {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_layers": args.layers,
             "num_heads": 4, "max_seq_length": args.seq}  # fmt: skip
    return load_config(None, [
        *(f"model.{k}={v}" for k, v in model.items()), f"data.seq_length={args.seq}",
        "train.micro_batch_size=1", f"train.global_batch_size={degree * args.micro_batches}",
        f"train.precision={args.precision}", f"parallel.data_sharding={mode}", "train.eval_interval=0",
        f"logging.run_dir={root}", "logging.progress_bar=false", "logging.tensorboard=false",
    ])  # fmt: skip


def state_bytes(trainer: Trainer, grad_buffer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (after a step)."""
    params = sum(local_shard(p)[0].nbytes for p in trainer.model.parameters())
    if grad_buffer is not None:
        grads = grad_buffer.data.nbytes
    else:
        grads = sum(local_shard(p.grad)[0].nbytes for p in trainer.model.parameters() if p.grad is not None)
    return {"params": params, "grads": grads, "optimizer": sum(trainer.optimizer.state_bytes().values())}


class AllocationPeak(TorchDispatchMode):
    """Bytes of the storages that ops create inside the mode while they live, and their peak.

    A storage an op reads that existed before the mode (parameters, buffers, optimizer state) is
    not counted, nor are views of it; each counted storage is dropped when torch frees it (a weak
    reference's callback), so `peak` is the high-water mark of what the step allocated on top.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.known: set[int] = set()
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.known.discard(key)
        self.current -= self.live.pop(key, 0)

    def _track(self, storage: torch.UntypedStorage, count: bool) -> None:
        key = storage.data_ptr()
        if key in self.known or not storage.nbytes():
            return
        self.known.add(key)
        weakref.finalize(storage, self._freed, key)
        if count:
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), count=False)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), count=True)
        return out


def peak_step_bytes(trainer: Trainer, grad_buffer) -> int:
    """What the rank holds when a step starts (its gradients dropped) plus the step's allocation peak."""
    trainer.optimizer.zero_grad()  # (full sharding frees its gradient shards; the buffer stays)
    start = state_bytes(trainer, grad_buffer)
    tracker = AllocationPeak()
    with tracker:
        trainer.train_step()
    return start["params"] + start["grads"] + start["optimizer"] + tracker.peak


def measure(args: argparse.Namespace, degree: int, mode: str) -> dict:
    """On every rank of one degree: a warm-up step, the state, the peak of one step, timed steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cfg = run_config(args, degree, mode, Path(root))
        layout = plan_layout(cfg, degree)
        ctx = (
            ParallelContext.build(layout) if dist.is_initialized() else ParallelContext.single(layout=layout)
        )
        parts = build_training(cfg, ctx, args.vocab)
        data = RandomTokens(args.vocab, args.seq)
        trainer = Trainer(cfg, parts.model, parts.optimizer, data, None, loss_fn=parts.loss_fn,
                          device=ctx.device, run_dir=Path(root), hooks=parts.hooks)  # fmt: skip
        trainer.train_step()
        held = state_bytes(trainer, getattr(parts.optimizer, "grad_buffer", None))
        peak = peak_step_bytes(trainer, getattr(parts.optimizer, "grad_buffer", None))
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        seconds = (time.perf_counter() - start) / args.steps
        trainer.close()
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPTModel(cfg.model).parameters())
    return {**held, "peak_step": peak, "step_s": seconds, "numel": numel}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def report_row(degree: int, mode: str, rank: int, got: dict, target: float) -> dict:
    """Print one rank's line; the check (state <= 1.1 x replicated / d) is full sharding's target."""
    total = got["params"] + got["grads"] + got["optimizer"]
    ratio = total / target
    ok = ("yes" if ratio <= 1.1 else "no") if mode == "full" else ""
    mib = [got[k] / MIB for k in ("params", "grads", "optimizer")] + [total / MIB, target / MIB]
    print(f"{degree:>2} {mode:>9} {rank:>4} " + " ".join(f"{v:>8.2f}" for v in mib)
          + f" {ratio:>6.3f} {ok:>3} {got['peak_step'] / MIB:>9.2f} {got['step_s']:>7.3f}")  # fmt: skip
    return {"degree": degree, "mode": mode, "rank": rank, **got, "state": total, "ratio": ratio}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"before: {uptime()}")
    replicated = measure(args, 1, "none")
    reference = replicated["params"] + replicated["grads"] + replicated["optimizer"]
    print(
        f"{args.precision} model, {replicated['numel']:,} parameters; replicated state per rank "
        f"{reference / MIB:.2f} MiB (params {replicated['params'] / MIB:.2f} + grads "
        f"{replicated['grads'] / MIB:.2f} + optimizer {replicated['optimizer'] / MIB:.2f}), "
        f"step peak {replicated['peak_step'] / MIB:.2f} MiB, {args.micro_batches} micro-batches of "
        f"1 x {args.seq} tokens per rank"
    )
    print(f"{'d':>2} {'mode':>9} {'rank':>4} {'params':>8} {'grads':>8} {'optim':>8} {'state':>8} "
          f"{'target':>8} {'ratio':>6} {'ok':>3} {'step peak':>9} {'step s':>7}   (MiB, s)")  # fmt: skip
    rows = []
    for degree in args.degrees:
        times = {}
        for mode in MODES:
            per_rank = run_distributed(measure, degree, args=args, degree=degree, mode=mode)
            times[mode] = max(r["step_s"] for r in per_rank)
            for rank, got in enumerate(per_rank):
                rows.append(report_row(degree, mode, rank, got, reference / degree))
        print(f"d={degree}: step time full / ZeRO-1 = {times['full'] / times['optimizer']:.2f} "
              f"({times['full']:.3f} s / {times['optimizer']:.3f} s, slowest rank)   {uptime()}")  # fmt: skip
    if args.json:
        text = json.dumps({"replicated": replicated, "rows": rows}, indent=2)
        if args.json == "-":
            print(text)
        else:
            tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, args.json)


if __name__ == "__main__":
    sys.exit(main())
