"""Bytes each rank communicates per training micro-batch under tensor parallelism, vs Megatron-LM's formula.

Measured: andromeda-1b's real widths (hidden 2048, 16 heads of 128, 1 KV head, SwiGLU 8192,
parallel block) at reduced depth (1 and 2 layers), batch 1 x seq 64 and vocabulary 1024, on gloo CPU
processes, fp32, counting in the collectives (`parallel.mappings.count_comm`). The two depths
separate the per-layer bytes from the embedding/head/loss bytes; activation collectives scale with
tokens and gradient syncs (`finalize_tp_grads`) with depth only, which gives the extrapolation to
the full model (16 layers) and batch (4 x 2048 tokens). The vocabulary does not enter: the
embedding moves (tokens, hidden) and the loss (tokens,) vectors.

Reference: Megatron-LM's analytic volume for the same layout, counted as payload (the logical
tensor an operation reduces or gathers), per layer forward + backward: 4 all-reduces of B*s*h
without sequence parallelism, 4 all-gathers + 4 reduce-scatters of B*s*h with it; plus the
embedding (1 x B*s*h), the head's input (1 or 2 x B*s*h) and the loss's three (B*s) fp32 vectors.
Megatron's SP also re-gathers each column-parallel input in backward (2 more all-gathers per layer);
the reference leaves that out, to its advantage. Ratio = ours / reference (< 1: ours moves less).

    .venv/bin/python benchmarks/bench_tp_comm.py [--tp 2 4 8]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from megatron_andromeda.config import ParallelConfig
from megatron_andromeda.models.gpt import GPTModel
from megatron_andromeda.models.presets import get_preset
from megatron_andromeda.parallel import (
    ParallelContext,
    RankLayout,
    finalize_tp_grads,
    make_loss_fn,
    parallelize_model,
)
from megatron_andromeda.parallel.mappings import count_comm
from megatron_andromeda.parallel.testing import run_distributed

FULL = get_preset("andromeda-1b")
FULL_BATCH, FULL_SEQ = 4, 2048
SMALL_BATCH, SMALL_SEQ, SMALL_VOCAB = 1, 64, 1024
BYTES = 4  # fp32 throughout, measured and analytic (bf16 activations would halve the activation terms)


def measure(depth: int, sp: bool, ctx: ParallelContext) -> dict[str, int]:
    """Payload and ring bytes this rank sends for one forward+backward, and for the gradient sync."""
    cfg = dataclasses.replace(FULL, num_layers=depth, vocab_size=SMALL_VOCAB, max_seq_length=SMALL_SEQ)
    model = GPTModel(cfg, init_seed=0)
    parallelize_model(model, ctx, ParallelConfig(tensor=ctx.tp_size, sequence_parallel=sp))
    loss_fn = make_loss_fn(ctx)
    tokens = torch.randint(
        0, SMALL_VOCAB, (SMALL_BATCH, SMALL_SEQ + 1), generator=torch.Generator().manual_seed(0)
    )
    with count_comm() as step:
        loss, _ = loss_fn(model(tokens[:, :-1]), tokens[:, 1:], z_loss=cfg.z_loss)
        loss.backward()
    with count_comm() as sync:
        finalize_tp_grads(model, ctx)
    return {
        "act_payload": step.total_payload,
        "act_wire": step.total_wire,
        "grad_payload": sync.total_payload,
        "grad_wire": sync.total_wire,
        "calls_per_step": sum(step.calls.values()),
    }


def worker() -> dict:
    tp = torch.distributed.get_world_size()
    ctx = ParallelContext.build(RankLayout(tp=tp, pp=1, dp=1))
    return {(sp, depth): measure(depth, sp, ctx) for sp in (False, True) for depth in (1, 2)}


def extrapolate(m1: dict, m2: dict, key: str, kind: str) -> float:
    """Full-model bytes from the 1- and 2-layer measurements: per-layer x 16 + fixed, scaled by tokens."""
    per_layer = m2[key] - m1[key]
    fixed = m1[key] - per_layer
    total = per_layer * FULL.num_layers + fixed
    if kind == "act":
        total *= (FULL_BATCH * FULL_SEQ) / (SMALL_BATCH * SMALL_SEQ)
    return total


def megatron_payload(sp: bool, batch: int, seq: int, layers: int) -> float:
    """Megatron-LM's analytic payload bytes per forward+backward (see the module docstring)."""
    bsh = batch * seq * FULL.hidden_size * BYTES
    per_layer = (8 if sp else 4) * bsh
    embedding = bsh  # forward all-reduce (reduce-scatter under SP)
    head = (2 if sp else 1) * bsh  # SP: gather forward + reduce-scatter backward; else backward all-reduce
    loss = 3 * batch * seq * 4  # max, sum of exp, target logit: fp32 (tokens,) vectors
    return layers * per_layer + embedding + head + loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    header = (
        f"{'tp':>3} {'SP':>3} | {'small run (MB)':>14} {'calls':>6} | {'ours full (GB)':>14} "
        f"{'Megatron (GB)':>13} {'ratio':>6} | {'ring sent (GB)':>14} {'grad sync (MB)':>14}"
    )
    print(f"andromeda-1b, per rank per micro-batch of {FULL_BATCH} x {FULL_SEQ} tokens, fp32 payload bytes")
    print(f"small run: 2 layers, {SMALL_BATCH} x {SMALL_SEQ} tokens, vocab {SMALL_VOCAB}, gloo CPU")
    print(header)
    print("-" * len(header))
    for tp in args.tp:
        results = run_distributed(worker, tp, timeout_s=1800)[0]  # every rank sends the same bytes
        for sp in (False, True):
            m1, m2 = results[(sp, 1)], results[(sp, 2)]
            ours = extrapolate(m1, m2, "act_payload", "act")
            ring = extrapolate(m1, m2, "act_wire", "act")
            grads = extrapolate(m1, m2, "grad_payload", "grad")
            reference = megatron_payload(sp, FULL_BATCH, FULL_SEQ, FULL.num_layers)
            small = m2["act_payload"] / 1e6
            print(
                f"{tp:>3} {'on' if sp else 'off':>3} | {small:>14.2f} {m2['calls_per_step']:>6} | "
                f"{ours / 1e9:>14.3f} {reference / 1e9:>13.3f} {ours / reference:>6.2f} | "
                f"{ring / 1e9:>14.3f} {grads / 1e6:>14.2f}"
            )


if __name__ == "__main__":
    main()
