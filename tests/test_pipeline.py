"""Pipeline parallelism on gloo against the single-process model, in fp32.

Plans (pure data) are checked exhaustively for deadlocks, message order and bubble size. Then every
schedule runs one training step and one forward-only pass at pipeline degree 2 and 4 (one spawn per
world size runs all cases): losses and gradients must equal those of the full model built from the
same seed (rtol 1e-5 / atol 1e-6; micro-batches are accumulated in the same order, so differences
are ~0). A stalled rank must end the run with every rank's stacks, well within the timeout.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from hang_guard import HANG_GUARD_S
from training_helpers import context_for

from megatron_andromeda.builder import build_model
from megatron_andromeda.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megatron_andromeda.models.gpt import GPTModel, language_model_loss
from megatron_andromeda.parallel import ParallelContext, RankLayout, plan_layout
from megatron_andromeda.parallel.hooks import no_pipelining
from megatron_andromeda.parallel.layout import check_schedule, split_layers
from megatron_andromeda.parallel.pipeline import Layout, build_pipeline_schedule, build_plan, simulate
from megatron_andromeda.parallel.pipeline.plans import compute_order
from megatron_andromeda.parallel.testing import DistributedTestError, run_distributed

RTOL, ATOL = 1e-5, 1e-6
MBS, SEQ = 2, 8
PALM = dict(block="parallel", activation="swiglu", position_embedding="rotary", norm="layernorm")
MPT = dict(block="sequential", activation="gelu", position_embedding="alibi", norm="rmsnorm", num_kv_heads=2)

# (model overrides, parallel overrides, micro-batches): every schedule at both degrees, tied and untied
# embeddings, explicit layer split, recomputation, and the interleaved special case m == p.
CASES = {
    2: [
        (dict(PALM, num_layers=4), dict(schedule="gpipe"), 4),
        (
            dict(MPT, num_layers=4, tie_embeddings=False),
            dict(layers_per_stage=[1, 3], recompute="selective"),
            4,
        ),
        (dict(PALM, num_layers=4), dict(virtual_stages=2, recompute="full"), 4),
        (dict(MPT, num_layers=4), dict(virtual_stages=2), 2),
    ],
    4: [
        (dict(MPT, num_layers=4), dict(schedule="gpipe"), 4),
        (dict(PALM, num_layers=6), dict(), 6),
        (dict(PALM, num_layers=8, tie_embeddings=False), dict(virtual_stages=2), 8),
        (dict(MPT, num_layers=9), dict(virtual_stages=2, layers_per_stage=[1, 1, 1, 2, 1, 1, 1, 1]), 4),
    ],
}


def run_config(model: dict, parallel: dict, pipeline: int, microbatches: int, **train) -> RunConfig:
    base = dict(vocab_size=64, hidden_size=32, num_heads=4, max_seq_length=SEQ, z_loss=1e-3)
    cfg = RunConfig(
        model=ModelConfig(**{**base, **model}),
        parallel=ParallelConfig(pipeline=pipeline, comm_timeout_s=HANG_GUARD_S, **parallel),
        train=TrainConfig(micro_batch_size=MBS, global_batch_size=MBS * microbatches, seed=5, **train),
        data=DataConfig(seq_length=SEQ),
    )
    return cfg.validate()


def batches(cfg: RunConfig, count: int) -> list[dict]:
    """Packed micro-batches: two documents per row, so every stage needs the batch's segment ids."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (count, MBS, SEQ + 1), generator=g)
    segments = (torch.arange(SEQ) >= torch.randint(1, SEQ, (count, MBS, 1), generator=g)).long()
    return [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MBS, SEQ), "segment_ids": s}
        for t, s in zip(tokens, segments)
    ]


def forward_step_for(cfg: RunConfig, microbatches: int):
    """The trainer's forward_step contract, with its loss divided by the number of micro-batches."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], segment_ids=batch["segment_ids"])

        def loss_fn(logits):
            loss, parts = language_model_loss(logits, batch["labels"], batch["loss_mask"], cfg.model.z_loss)
            return loss / microbatches, parts

        return output, loss_fn

    return forward_step


def unprefixed(name: str) -> str:
    """'1.layers.5.mlp...' (chunk 1 of an interleaved rank) -> 'layers.5.mlp...'."""
    head, _, rest = name.partition(".")
    return rest if head.isdigit() else name


# --------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_plans_are_deadlock_free_with_the_theoretical_bubble(schedule):
    """Every layout completes with matching messages; its ideal bubble is (p-1)/(v*m+p-1)."""
    chunk_counts = (2, 3) if schedule == "interleaved" else (1,)
    for p in range(2 if schedule == "interleaved" else 1, 7):
        for v in chunk_counts:
            for m in range(p, 4 * p + 1, p if v > 1 else 1):
                layout = Layout(p, v, m)
                plans = [build_plan(schedule, layout, r) for r in range(p)]
                timeline = simulate(plans, layout, forward_cost=1 / v, backward_cost=2 / v)
                for r in range(p):
                    assert timeline.bubble(r) == pytest.approx((p - 1) / (v * m + p - 1)), (p, v, m, r)
            for m in range(1, 3 * p + 2):  # evaluation: any number of micro-batches
                layout = Layout(p, v, m)
                simulate([build_plan(schedule, layout, r, forward_only=True) for r in range(p)], layout)


def test_1f1b_bounds_the_micro_batches_in_flight():
    """GPipe keeps all m micro-batches' activations; 1F1B at most p - r on rank r."""
    layout = Layout(4, 1, 12)
    for rank in range(4):
        for schedule, bound in (("gpipe", 12), ("1f1b", 4 - rank)):
            alive, peak = 0, 0
            for compute in compute_order(schedule, layout, rank):
                alive += -1 if compute.backward else 1
                peak = max(peak, alive)
            assert peak == bound, (schedule, rank)


def test_split_layers():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]  # the head's stage gets fewer
    assert split_layers(6, 2, 2, [1, 2, 2, 1]) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    with pytest.raises(ConfigError, match="parallel.layers_per_stage has 2 entries but there are 4 stages"):
        split_layers(6, 2, 2, [3, 3])
    with pytest.raises(ConfigError, match="summing to model.num_layers=6"):
        split_layers(6, 2, 1, [2, 3])
    with pytest.raises(ConfigError, match="model.num_layers=3 cannot give each of the 4"):
        split_layers(3, 4)


@pytest.mark.parametrize(
    "parallel, microbatches, message",
    [
        (dict(pipeline=4), 2, "2 micro-batches per step .* cannot fill parallel.pipeline=4"),
        (dict(pipeline=2, virtual_stages=2), 3, "not a multiple"),
        (dict(pipeline=2, virtual_stages=2, schedule="gpipe"), 4, "gpipe has no interleaved form"),
        (dict(pipeline=1, virtual_stages=2), 4, "needs parallel.pipeline > 1"),
    ],
)
def test_bad_schedule_configuration_fails_fast(parallel, microbatches, message):
    pc = ParallelConfig(**parallel)
    with pytest.raises(ConfigError, match=message):
        check_schedule(pc.pipeline, pc.virtual_stages, pc.schedule, microbatches)


def test_whole_pipeline_config_is_checked_before_any_process_group():
    cfg = run_config(dict(PALM, num_layers=4), dict(virtual_stages=2), 2, 4)
    layout = plan_layout(cfg, world_size=2)  # 4 layers over 4 virtual stages, 4 micro-batches
    assert layout.num_microbatches == 4 and layout.schedule == "interleaved"
    assert layout.spans_of(1) == [(1, range(1, 2)), (3, range(3, 4))]
    with pytest.raises(ConfigError, match="cannot fill parallel.pipeline=2"):
        plan_layout(cfg, world_size=8)  # data 4: 8 samples / (2 x 4) = 1 micro-batch per rank
    cfg.parallel.layers_per_stage = [2, 1, 1]
    with pytest.raises(ConfigError, match="layers_per_stage has 3 entries but there are 4 stages"):
        plan_layout(cfg, world_size=2)


# --------------------------------------------------------------------------------------------- distributed
def run_case(
    ctx: ParallelContext, model_overrides: dict, parallel_overrides: dict, microbatches: int
) -> dict:
    cfg = run_config(model_overrides, parallel_overrides, ctx.pp_size, microbatches)
    ctx = context_for(cfg, groups_of=ctx)
    model = build_model(cfg, ctx).train()
    schedule = build_pipeline_schedule(ctx, cfg.model, SEQ, torch.float32, comm_timeout_s=HANG_GUARD_S)
    forward_step = forward_step_for(cfg, microbatches)
    data = batches(cfg, microbatches)
    weights = {unprefixed(n): p.detach().clone() for n, p in model.named_parameters()}
    sent = []  # the outputs of non-last stages: the executor frees their values once sent

    def recording_step(data_iterator, stage):
        output, loss_fn = forward_step(data_iterator, stage)
        if not stage.post_process:
            sent.append(output)
        return output, loss_fn

    parts = schedule(recording_step, iter(data), model, microbatches)
    grads = {unprefixed(n): p.grad.clone() for n, p in model.named_parameters()}
    eval_parts = schedule(forward_step, iter(data), model, microbatches, forward_only=True)
    try:  # the executor re-checks the micro-batch count before communicating
        schedule(forward_step, iter(data), model, 1)
        error = ""
    except ConfigError as err:
        error = str(err)
    return {
        "losses": [p["lm_loss"] for p in parts],
        "eval_losses": [p["lm_loss"] for p in eval_parts],
        "weights": weights,
        "grads": grads,
        "too_few_microbatches": error,
        "sent_sizes": [t.numel() for t in sent],
    }


def checks_on_rank(pipeline: int) -> dict:
    """Every distributed check of this file (and, on 2 ranks, test_recompute.py's) on one rank."""
    ctx = ParallelContext.build(RankLayout(tp=1, pp=pipeline, dp=1))
    results = {"cases": [run_case(ctx, *case) for case in CASES[pipeline]]}
    if pipeline == 2:
        import test_recompute

        results["recompute"] = test_recompute.tensor_parallel_checks()
    return results


@functools.cache
def spawn_results(world_size: int) -> list[dict]:
    """One spawn per world size for the session (spawning costs seconds); one dict per rank."""
    return run_distributed(checks_on_rank, world_size, pipeline=world_size)


def reference(model_overrides: dict, parallel_overrides: dict, microbatches: int) -> dict:
    cfg = run_config(model_overrides, {}, 1, microbatches)
    model = GPTModel(cfg.model, init_seed=cfg.train.seed).train()
    parts = no_pipelining(
        forward_step_for(cfg, microbatches), iter(batches(cfg, microbatches)), model, microbatches
    )
    return {
        "losses": [p["lm_loss"] for p in parts],
        "weights": {n: p.detach() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


@pytest.fixture(scope="module", params=[2, 4], ids=["pp2", "pp4"])
def pipeline_run(request):
    return request.param, spawn_results(request.param)


def _close(actual, expected, label):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}: {m}")


def test_matches_single_process(pipeline_run):
    world_size, ranks = pipeline_run
    for index, (model_overrides, parallel_overrides, microbatches) in enumerate(CASES[world_size]):
        label = f"pp={world_size} {parallel_overrides} {model_overrides}"
        ref = reference(model_overrides, parallel_overrides, microbatches)
        shards = [r["cases"][index] for r in ranks]
        _close(torch.stack(shards[-1]["losses"]), torch.stack(ref["losses"]), f"{label} losses")
        _close(torch.stack(shards[-1]["eval_losses"]), torch.stack(ref["losses"]), f"{label} eval losses")
        assert all(not s["losses"] and not s["eval_losses"] for s in shards[:-1]), (
            "loss parts off the last stage"
        )
        assert all("cannot fill" in s["too_few_microbatches"] for s in shards), label
        sent = [n for s in shards for n in s["sent_sizes"]]
        assert sent and set(sent) == {1}, f"{label}: sent activations kept their values: {sent}"
        tied = "lm_head.weight" not in ref["grads"]
        if tied:  # the last stage's head is a copy of the embedding; their gradients add up
            head, embedding = shards[-1], shards[0]
            _close(
                head["weights"].pop("lm_head.weight"),
                ref["weights"]["embedding.weight"],
                f"{label} tied init",
            )
            head_grad = head["grads"].pop("lm_head.weight")
            _close(
                head_grad + embedding["grads"].pop("embedding.weight"),
                ref["grads"]["embedding.weight"],
                label,
            )
        seen = {"embedding.weight"} if tied else set()
        for s in shards:
            for name, grad in s["grads"].items():
                _close(s["weights"][name], ref["weights"][name], f"{label} {name} init")
                _close(grad, ref["grads"][name], f"{label} {name}")
                assert name not in seen, f"{name} lives on two stages"
                seen.add(name)
        assert seen == set(ref["grads"]), f"{label}: parameters missing from every stage"


# --------------------------------------------------------------------------------------------- watchdog
def stalled_forward_step(data_iterator, model):
    """Rank 1 never finishes its second micro-batch: its peer waits for an activation forever."""
    batch = next(data_iterator)
    if torch.distributed.get_rank() == 1 and batch["stall"]:
        time.sleep(120)
    return model(batch["tokens"], segment_ids=batch["segment_ids"]), lambda logits: (logits.sum(), {})


def stall_worker(dump_dir: str) -> None:
    from megatron_andromeda.parallel.pipeline import Watchdog

    cfg = run_config(dict(PALM, num_layers=2), {}, 2, 2)
    cfg.parallel.comm_timeout_s = 2.0
    ctx = context_for(cfg)
    model = build_model(cfg, ctx)
    watchdog = Watchdog.for_job(2.0, dump_dir=dump_dir)
    schedule = build_pipeline_schedule(ctx, cfg.model, SEQ, torch.float32, watchdog=watchdog)
    data = [dict(b, stall=i == 1) for i, b in enumerate(batches(cfg, 2))]
    schedule(stalled_forward_step, iter(data), model, 2)


def test_stalled_rank_fails_with_every_stack(tmp_path):
    # The watchdog (2 s) ends the run: the ranks exit without a result. Had it not, the harness's
    # hang guard would have reported "timed out waiting" instead (no wall-clock assertion here).
    with pytest.raises(DistributedTestError, match="exited without a result"):
        run_distributed(stall_worker, 2, timeout_s=HANG_GUARD_S, dump_dir=str(tmp_path))
    waiting, stalled = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert "watchdog: no progress for" in waiting and "parallel.comm_timeout_s=2" in waiting
    assert "receive gradient of micro-batch 1" in waiting and "in exchange" in waiting
    assert "rank 0 aborted the job" in stalled and "in stalled_forward_step" in stalled


def test_watchdog_config_error():
    from megatron_andromeda.parallel.pipeline import Watchdog

    with pytest.raises(ValueError, match="parallel.comm_timeout_s=0 must be positive"):
        Watchdog(0)
