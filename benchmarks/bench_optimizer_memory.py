"""Per-rank optimizer memory of the ZeRO-1 distributed optimizer at data-parallel degree 1, 2, 4.

Each degree runs on that many gloo (CPU) processes: build the model, take one real step (forward,
backward, bucketed reduce-scatter, AdamW on the shard, all-gather) so that the Adam moments exist,
then count the bytes of the state tensors each rank holds: fp32 master weights (copies only: fp32
parameters are their own masters), exp_avg and exp_avg_sq. The reference, measured in the same run
on one process, is the replicated optimizer (`parallel.distributed_optimizer=false`): every rank of
a data-parallel run holds that much.

    .venv/bin/python benchmarks/bench_optimizer_memory.py                       # bf16, 7.8 M params
    .venv/bin/python benchmarks/bench_optimizer_memory.py --precision fp32 --json out.json

Columns: `expected` is replicated / d; `ratio` is replicated / measured (ideally d). The padding that
makes every bucket split into d equal slices is not optimizer state; it only makes the ranks' shares
differ by up to 64 x d elements per bucket. The fp32 gradient buffer (4 bytes per parameter on every
rank: ZeRO-1 does not shard gradients) is not counted. Full sharding (FSDP2), which shards the
weights and gradients too: benchmarks/bench_data_sharding.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_andromeda.builder import build_model
from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.models import language_model_loss
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.hooks import build_parallel_training
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.training.optim import parameter_groups

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--bucket", type=int, default=2**20, help="gradient bucket size in elements")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    if min(args.degrees) < 1 or min(args.hidden, args.layers, args.vocab, args.bucket) < 1:
        p.error("--degrees, --hidden, --layers, --vocab and --bucket must be >= 1")
    return args


def run_config(args: argparse.Namespace, degree: int, sharded: bool) -> RunConfig:
    return load_config(
        None,
        [
            f"model.vocab_size={args.vocab}",
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            "model.num_heads=4",
            "model.max_seq_length=32",
            "data.seq_length=32",
            "train.micro_batch_size=1",
            f"train.global_batch_size={degree}",
            f"train.precision={args.precision}",
            f"parallel.distributed_optimizer={str(sharded).lower()}",
        ],
    )


def measure(args: argparse.Namespace, degree: int, sharded: bool) -> dict[str, int]:
    """One step on this rank; the bytes of its optimizer state (call on every rank of the degree)."""
    torch.set_num_threads(1)
    cfg = run_config(args, degree, sharded)
    layout = plan_layout(cfg, degree)
    ctx = ParallelContext.build(layout) if dist.is_initialized() else ParallelContext.single(layout=layout)
    model = build_model(cfg, ctx)  # parameters in the run's precision, as the trainer has them
    groups = parameter_groups(model, cfg.optim)
    parallel = build_parallel_training(ctx, model, cfg, groups, bucket_numel=args.bucket)
    tokens = torch.randint(0, args.vocab, (1, 33), generator=torch.Generator().manual_seed(ctx.dp_rank))
    parallel.optimizer.zero_grad()
    loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    parallel.hooks.finish_gradients(model)
    parallel.optimizer.step()
    return {**parallel.optimizer.state_bytes(), "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    replicated = measure(args, 1, sharded=False)
    reference = replicated["master"] + replicated["exp_avg"] + replicated["exp_avg_sq"]
    print(
        f"{args.precision} model, {replicated['params']:,} parameters; replicated optimizer state "
        f"{reference / MIB:.2f} MiB per rank (master {replicated['master'] / MIB:.2f} + m + v)"
    )
    header = f"{'d':>2} {'rank':>4} {'master MiB':>11} {'exp_avg MiB':>12} {'exp_avg_sq MiB':>15} "
    print(header + f"{'total MiB':>10} {'expected MiB':>13} {'ratio':>6}")
    rows = []
    for degree in args.degrees:
        if degree == 1:
            per_rank = [measure(args, 1, sharded=True)]
        else:
            per_rank = run_distributed(measure, degree, args=args, degree=degree, sharded=True)
        for rank, got in enumerate(per_rank):
            total = got["master"] + got["exp_avg"] + got["exp_avg_sq"]
            rows.append(
                {"degree": degree, "rank": rank, **got, "total": total, "expected": reference / degree}
            )
            print(f"{degree:>2} {rank:>4} {got['master'] / MIB:>11.3f} {got['exp_avg'] / MIB:>12.3f} "
                  f"{got['exp_avg_sq'] / MIB:>15.3f} {total / MIB:>10.3f} {reference / degree / MIB:>13.3f} "
                  f"{reference / total:>6.3f}")  # fmt: skip
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
