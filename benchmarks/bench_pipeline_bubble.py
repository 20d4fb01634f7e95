"""Pipeline bubble of 1F1B and interleaved 1F1B: measured per rank on gloo vs the theory.

    .venv/bin/python benchmarks/bench_pipeline_bubble.py [--forward-ms 20] [--backward-ms 40] [--repeats 3]

Four spawned CPU processes run the real schedules (plans, p2p exchange, executor) over fake stages
of known cost: a stage's forward sleeps `forward-ms` per micro-batch and its backward `backward-ms`
(split evenly over the v chunks of an interleaved rank). Sleeping keeps the measurement clean on a
machine with fewer cores than ranks. Each rank reports the time it spent computing (the sleeps, as
measured) and the wall time of the step, from a barrier before the schedule to a barrier after it
(the step ends when the last rank is done); its bubble is the idle share 1 - busy / wall.

Theory, with p stages, m micro-batches and a forward + backward of t per micro-batch and stage:
1F1B's steady state keeps every stage busy, but filling and draining the pipeline costs (p - 1) t
on every rank, so the bubble is (p - 1) t / (m t + (p - 1) t) = (p - 1) / (m + p - 1). With v
chunks per rank a chunk costs t / v, and the fill and drain are paid in chunk steps, (p - 1) t / v:
the bubble becomes ((p - 1) / v) / (m + (p - 1) / v) = (p - 1) / (v m + p - 1). The "plan" column
is the ideal bubble of the exact plan that runs (plans.simulate with free communication); it equals
the formula. The ratio column divides the measured bubble by the theory (1.0 = no overhead beyond
the schedule itself; communication and scheduling latency push it up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.parallel import ParallelContext, RankLayout
from megatron_andromeda.parallel.pipeline import Layout, PipelineComm, build_plan, simulate
from megatron_andromeda.parallel.pipeline.schedules import SCHEDULE_FUNCTIONS
from megatron_andromeda.parallel.testing import run_distributed

PIPELINE = 4
MICROBATCHES = (4, 8, 16)
RUNS = (("1f1b", 1), ("interleaved", 2))
SHAPE = (1, 4, 8)  # (micro-batch, sequence, hidden): tiny, so that the messages cost ~nothing


class BusyClock:
    """Accumulates the time this rank spends "computing" (sleeping for a stage's known cost)."""

    def __init__(self) -> None:
        self.busy = 0.0

    def work(self, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        self.busy += time.perf_counter() - start


class _Timed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float, clock: BusyClock):
        ctx.backward_s, ctx.clock = backward_s, clock
        clock.work(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.work(ctx.backward_s)
        return grad, None, None, None


class FakeStage(nn.Module):
    """A pipeline stage whose forward and backward take a known time; same protocol as PipelineStage."""

    def __init__(self, forward_s: float, backward_s: float, clock: BusyClock):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.forward_s, self.backward_s, self.clock = forward_s, backward_s, clock
        self._input: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self._input = tensor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch if self._input is None else self._input  # (B, T, D)
        return _Timed.apply(x * self.weight, self.forward_s, self.backward_s, self.clock)


def forward_step(data_iterator, model: nn.Module):
    output = model(next(data_iterator))
    return output, lambda out: (out.sum(), {"lm_loss": out.detach().sum()})


def measure_on_rank(forward_ms: float, backward_ms: float, repeats: int) -> dict:
    """On each of the 4 ranks: median busy and wall time of every (schedule, m)."""
    ctx = ParallelContext.build(RankLayout(tp=1, pp=PIPELINE, dp=1))
    ranks = [ctx.layout.rank_of(p, 0, 0) for p in range(PIPELINE)]
    comm = PipelineComm(ctx.pp_group, ranks, ctx.pp_rank, SHAPE, torch.float32, ctx.device)
    results = {}
    for schedule, chunks in RUNS:
        clock = BusyClock()
        stages = [
            FakeStage(forward_ms / 1e3 / chunks, backward_ms / 1e3 / chunks, clock) for _ in range(chunks)
        ]
        model = stages[0] if chunks == 1 else nn.ModuleList(stages)
        run = SCHEDULE_FUNCTIONS[schedule]
        for m in MICROBATCHES:
            samples = []
            for repeat in range(repeats + 1):  # the first call connects the peers: not measured
                data = iter([torch.ones(SHAPE) for _ in range(m)])
                dist.barrier(group=ctx.pp_group)
                clock.busy, start = 0.0, time.perf_counter()
                run(forward_step, data, model, m, comm=comm)
                dist.barrier(group=ctx.pp_group)  # the step ends when the last rank is done
                if repeat:
                    samples.append((clock.busy, time.perf_counter() - start))
            results[(schedule, m)] = min(samples, key=lambda s: s[1] - s[0])  # least disturbed run
    return results


def theory(chunks: int, m: int) -> float:
    return (PIPELINE - 1) / (chunks * m + PIPELINE - 1)


def plan_bubble(schedule: str, chunks: int, m: int, forward_ms: float, backward_ms: float) -> float:
    layout = Layout(PIPELINE, chunks, m)
    plans = [build_plan(schedule, layout, r) for r in range(PIPELINE)]
    timeline = simulate(plans, layout, forward_ms / chunks, backward_ms / chunks)
    return max(timeline.bubble(r) for r in range(PIPELINE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--forward-ms", type=float, default=20.0, help="forward time per micro-batch and stage"
    )
    parser.add_argument(
        "--backward-ms", type=float, default=40.0, help="backward time per micro-batch and stage"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per setting (the best is kept)")
    args = parser.parse_args()
    ranks = run_distributed(
        measure_on_rank, PIPELINE, timeout_s=900,
        forward_ms=args.forward_ms, backward_ms=args.backward_ms, repeats=args.repeats,
    )  # fmt: skip
    print(f"pipeline degree {PIPELINE}, forward {args.forward_ms:g} ms + backward {args.backward_ms:g} ms "
          "per micro-batch and stage (sleep-based fake stages, gloo)")  # fmt: skip
    print(f"{'schedule':<12} {'v':>2} {'m':>3}  {'bubble per rank (measured)':<30} {'mean':>6} "
          f"{'theory':>7} {'plan':>6} {'ratio':>6}")  # fmt: skip
    summary = {}
    for schedule, chunks in RUNS:
        for m in MICROBATCHES:
            bubbles = [1.0 - busy / wall for busy, wall in (r[(schedule, m)] for r in ranks)]
            mean, expected = statistics.mean(bubbles), theory(chunks, m)
            plan = plan_bubble(schedule, chunks, m, args.forward_ms, args.backward_ms)
            summary[(chunks, m)] = mean
            per_rank = " ".join(f"{b:.3f}" for b in bubbles)
            print(f"{schedule:<12} {chunks:>2} {m:>3}  {per_rank:<30} {mean:>6.3f} {expected:>7.3f} "
                  f"{plan:>6.3f} {mean / expected:>6.2f}")  # fmt: skip
    for m in MICROBATCHES:
        print(f"m={m:>2}: interleaved (v=2) bubble / 1F1B bubble = {summary[(2, m)] / summary[(1, m)]:.2f} "
              f"(theory {theory(2, m) / theory(1, m):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
