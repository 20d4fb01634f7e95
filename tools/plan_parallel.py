#!/usr/bin/env python3
"""Recommend tensor / pipeline / data layouts for a model on a cluster, and dry-run one on CPU.

    python tools/plan_parallel.py --model andromeda-1b --nodes 2 --gpu h100
    python tools/plan_parallel.py --config examples/configs/andromeda_1b.yaml --nodes 8 --top 10
    python tools/plan_parallel.py --model andromeda-1b --nodes 8 --layout 2,4 --micro-batch 4 --dry-run
    python tools/plan_parallel.py --model andromeda-500m --nodes 4 --print-overrides   # for launch scripts
    python tools/plan_parallel.py --model mpt-7b --layout 1,1 --sharding full --micro-batch 4 --dry-run

Estimates (megatron_andromeda/planner.py documents the formulas) are per GPU: weights, gradients,
AdamW states (sharded by the distributed optimizer, or all three by full sharding: FSDP2, HSDP
across nodes), activations of the micro-batches in flight (with and without recomputation) and the
step time. The search tries every data sharding; `--layout` takes `--sharding` and `--data-replicas`.
`--dry-run` validates the chosen layout with `parallel.validate_layout` and builds every process
group of every rank with torch's fake backend (no processes, no network), checking each rank's
groups (and, under full sharding, its device-mesh coordinates) against the layout tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from megatron_andromeda.config import ConfigError, ModelConfig, ParallelConfig, load_config
from megatron_andromeda.errors import print_error, report_user_errors
from megatron_andromeda.models.presets import get_preset
from megatron_andromeda.planner import (
    GIB,
    GPUS,
    LINKS,
    RECOMPUTE,
    Cluster,
    Layout,
    Plan,
    Precision,
    evaluate,
    format_plans,
    layout_problem,
    recommend,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a preset name, e.g. andromeda-1b")
    source.add_argument("--config", help="a run config YAML (model, data.seq_length, train.* are read)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for --config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="sets peak TFLOP/s and memory")
    p.add_argument("--memory-gib", type=float, help="memory per GPU (default: the --gpu's)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: the --gpu's)")
    p.add_argument("--intra", default="nvlink4", help=f"link within a node: {', '.join(LINKS)} or GB/s")
    p.add_argument("--inter", default="ib-ndr", help="link across nodes, per GPU: a name or GB/s")
    p.add_argument("--seq-length", type=int, help="default: the config's data.seq_length or 2048")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: config's or 1024)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: config's or bf16")
    p.add_argument("--efficiency", type=float, default=0.5, help="achieved fraction of peak (measured MFU)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--layout", help="evaluate this layout instead of searching: TP,PP[,DP]")
    p.add_argument("--micro-batch", type=int, default=1, help="with --layout")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none", help="with --layout")
    p.add_argument("--no-sequence-parallel", action="store_true", help="with --layout and TP > 1")
    p.add_argument("--sharding", choices=("none", "optimizer", "full"), default="optimizer",
                   help="with --layout and DP > 1: parallel.data_sharding (default: ZeRO-1)")  # fmt: skip
    p.add_argument(
        "--data-replicas", type=int, default=1, help="with --layout and --sharding full: HSDP replicas"
    )
    p.add_argument("--dry-run", action="store_true", help="build every process group of the chosen layout")
    p.add_argument("--print-overrides", action="store_true", help="print the best layout's overrides only")
    p.add_argument("--json", metavar="PATH", help="also write the plans as JSON")
    args = p.parse_args(argv)
    if args.overrides and not args.config:
        p.error("key=value overrides need --config")
    for name in ("nodes", "gpus_per_node", "top", "micro_batch", "data_replicas"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _link(value: str, flag: str) -> float:
    if value in LINKS:
        return LINKS[value]
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is neither a link name ({', '.join(LINKS)}) nor GB/s") from None


def resolve_inputs(args: argparse.Namespace) -> tuple[ModelConfig, Cluster, int, int, str]:
    """(model, cluster, seq_length, global_batch, precision) from the flags and the config file."""
    seq, batch, precision = 2048, 1024, "bf16"
    if args.config:
        run = load_config(args.config, args.overrides)
        model, seq, batch, precision = (
            run.model,
            run.data.seq_length,
            run.train.global_batch_size,
            run.train.precision,
        )
    else:
        model = get_preset(args.model)
    peak, memory = GPUS[args.gpu]
    cluster = Cluster(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        memory_gib=args.memory_gib or memory,
        peak_tflops=args.peak_tflops or peak,
        intra_gbs=_link(args.intra, "--intra"),
        inter_gbs=_link(args.inter, "--inter"),
    )
    return model, cluster, args.seq_length or seq, args.global_batch or batch, args.precision or precision


def explicit_layout(args: argparse.Namespace, world: int) -> Layout:
    try:
        degrees = [int(x) for x in args.layout.split(",")]
    except ValueError:
        raise ConfigError(f"--layout {args.layout!r} must be TP,PP or TP,PP,DP (integers)") from None
    if len(degrees) not in (2, 3) or min(degrees) < 1:
        raise ConfigError(f"--layout {args.layout!r} must be TP,PP or TP,PP,DP (positive integers)")
    tp, pp = degrees[:2]
    dp = degrees[2] if len(degrees) == 3 else world // (tp * pp)
    if tp * pp * dp != world:
        raise ConfigError(
            f"--layout {args.layout}: {tp} x {pp} x {dp} != {world} GPUs (--nodes x --gpus-per-node)"
        )
    sp = tp > 1 and not args.no_sequence_parallel
    sharding = args.sharding if dp > 1 else "none"
    return Layout(
        tp, pp, dp, args.micro_batch, sp, sharding == "optimizer", args.recompute,
        full_sharding=sharding == "full", data_replicas=args.data_replicas,
    )  # fmt: skip


def dry_run(layout: Layout, model: ModelConfig, seq_length: int) -> dict[str, tuple[int, int]]:
    """Validate `layout` and build every rank's groups on the fake backend; {group: (count, size)}.

    Each rank in turn joins a fake world of the layout's size and builds the ParallelContext, which
    calls `new_group` for every group in the same order as a real launch; the groups it keeps are
    checked against RankLayout's tables.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers backend "fake"

    from megatron_andromeda.parallel import ParallelContext, validate_layout
    from megatron_andromeda.parallel.layout import RunLayout, check_data_sharding

    parallel = ParallelConfig(
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        data=layout.data,
        sequence_parallel=layout.sequence_parallel,
        data_sharding=layout.sharding,
        data_replicas=layout.data_replicas,
        recompute=layout.recompute,
    )
    ranks = validate_layout(parallel, model, layout.world_size, seq_length)
    sharding = check_data_sharding(parallel, ranks.dp)
    ranks = RunLayout(
        ranks.tp, ranks.pp, ranks.dp, data_sharding=sharding, data_replicas=parallel.data_replicas
    )
    tables = {
        "tp_group": ranks.tp_groups(),
        "dp_group": ranks.dp_groups(),
        "pp_group": ranks.pp_groups(),
        "embedding_group": ranks.embedding_groups(),
        "mp_group": ranks.model_parallel_groups(),
        "stage_group": ranks.stage_groups(),
    }
    if ranks.fully_sharded and ranks.data_replicas > 1:
        tables.update(dp_shard_group=ranks.dp_shard_groups(), dp_replicate_group=ranks.dp_replicate_groups())
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a process without a default process group")
    for rank in range(ranks.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks.world_size)
        try:
            ctx = ParallelContext.build(ranks)
            for name in tables:
                group = getattr(ctx, name)
                got = None if group is None else dist.get_process_group_ranks(group)
                want = next((g for g in tables[name] if rank in g), None)  # middle stages: no embedding group
                if got != want:
                    raise RuntimeError(f"rank {rank}: {name} has ranks {got}, the layout says {want}")
            _check_mesh(ctx, ranks, rank)
        finally:
            dist.destroy_process_group()
    return {name: (len(groups), len(groups[0])) for name, groups in tables.items()}


def _check_mesh(ctx, ranks, rank: int) -> None:
    """Full sharding: the device mesh's coordinates of `rank` are its layout coordinates."""
    if ctx.mesh is None:
        return
    pp, dp, tp = ranks.coords(rank)
    replica, shard = ranks.data_coords(rank)
    want = [pp, replica, shard, tp] if ranks.data_replicas > 1 else [pp, dp, tp]
    if list(ctx.mesh.get_coordinate()) != want:
        raise RuntimeError(
            f"rank {rank}: mesh coordinate {ctx.mesh.get_coordinate()}, the layout says {want}"
        )


def plans_json(plans: list[Plan]) -> list[dict]:
    return [
        {
            "layout": asdict(p.layout),
            "overrides": p.layout.overrides(),
            "memory_gib": p.memory.as_gib(),
            "step_seconds": asdict(p.time) | {"total": p.time.total},
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
            "mfu": p.mfu,
            "fits": p.fits,
        }
        for p in plans
    ]


def _write_json(path: str, payload: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, cluster, seq, batch, precision_name = resolve_inputs(args)
        precision = Precision.for_training(precision_name)
        common = dict(seq_length=seq, global_batch=batch, precision=precision, efficiency=args.efficiency)
        if args.layout:
            layout = explicit_layout(args, cluster.world_size)
            problem = layout_problem(model, layout, batch, seq)
            if problem:
                raise ConfigError(f"--layout {args.layout}: {problem}")
            plans = [evaluate(model, layout, cluster, **common)]
        else:
            plans = recommend(model, cluster, top=args.top, **common)
    except ConfigError as err:
        return print_error(err, "plan_parallel")
    if args.print_overrides:
        print(" ".join(plans[0].layout.overrides()))
        return 0
    print(
        f"{model.name} on {cluster.nodes} x {cluster.gpus_per_node} GPUs ({cluster.memory_gib:g} GiB, "
        f"{cluster.peak_tflops:g} TFLOP/s), seq {seq}, global batch {batch}, {precision_name}"
    )
    print(format_plans(plans))
    best = plans[0]
    if not best.fits:
        print(f"warning: this layout needs {best.memory.total / GIB:.1f} GiB per GPU, more than fits")
    mem = best.memory.as_gib()
    print("memory of the first row (GiB): " + ", ".join(f"{k} {v}" for k, v in mem.items()))
    print("overrides: " + " ".join(best.layout.overrides()))
    if args.json:
        _write_json(args.json, plans_json(plans))
    if args.dry_run:
        try:
            groups = dry_run(best.layout, model, seq)
        except ConfigError as err:
            return print_error(err, "plan_parallel: dry run")
        built = ", ".join(f"{n.removesuffix('_group')} {c} x {s}" for n, (c, s) in groups.items())
        print(f"dry run: {best.layout.world_size} ranks, every group built and checked ({built})")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
