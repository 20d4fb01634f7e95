"""The ZeRO-1 distributed optimizer and the global gradient norm under tensor, pipeline and data groups.

Runs in the shared spawns of test_data_parallel.py. Everything is compared with the single-process
trainer using torch's AdamW, in fp32; tolerances as in test_data_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_parallel import (
    BUCKET,
    Tokens,
    assert_params_close,
    build_trainer,
    params_of,
    reference_trainer,
    results_of,
    run_config,
    train,
)
from training_helpers import context_for

from megatron_andromeda.models import GPTModel
from megatron_andromeda.parallel import ParallelContext, RankLayout
from megatron_andromeda.parallel.data_parallel import FlatLayout
from megatron_andromeda.parallel.distributed_optimizer import merge_optimizer_states
from megatron_andromeda.parallel.hooks import build_parallel_training, no_pipelining
from megatron_andromeda.parallel.sharding import merge_param
from megatron_andromeda.training.optim import parameter_groups

SHARDED = "parallel.distributed_optimizer=true"
TP_STEPS = 4
# Sequence parallelism (norm gradients are partial sums over tensor ranks) and one KV head shared by
# both tensor ranks (replicated rows) are the two cases a tensor-parallel norm can double count.
TP_ARGS = ("parallel.tensor=2", "parallel.sequence_parallel=true", "model.num_kv_heads=1")


# --------------------------------------------------------------------------------------------- on each rank
def distributed_checks(world_size: int, root: Path) -> dict:
    ctx = ParallelContext.build(RankLayout(tp=1, pp=1, dp=world_size))
    trainer, parallel = build_trainer(run_config(root / "zero", SHARDED), ctx, Tokens(), root / "zero")
    out = {
        "zero": {
            **train(trainer),
            "params": params_of(trainer.model),
            "state": parallel.optimizer.state_dict(),
            "bytes": parallel.optimizer.state_bytes(),
            "padded_numel": parallel.optimizer.grad_buffer.layout.numel,
        }
    }
    if world_size == 4:
        tp_ctx = ParallelContext.build(RankLayout(tp=2, pp=1, dp=2))
        for name, extra in (("tp_dp_plain", ()), ("tp_dp_zero", (SHARDED,))):
            trainer, _ = build_trainer(
                run_config(root / name, *TP_ARGS, *extra), tp_ctx, Tokens(), root / name
            )
            out[name] = {**train(trainer, TP_STEPS), "params": params_of(trainer.model)}
        pp_ctx = ParallelContext.build(RankLayout(tp=1, pp=2, dp=2))
        out["pp_dp"] = {sharded: _pipeline_norm(pp_ctx, root / "pp", sharded) for sharded in (False, True)}
    return out


def _pipeline_norm(ctx: ParallelContext, root: Path, sharded: bool) -> dict:
    """Known gradients on two stages: data average, tied-embedding sum across stages, norm counted once."""
    cfg = run_config(root, "parallel.pipeline=2", f"parallel.distributed_optimizer={str(sharded).lower()}")
    first = ctx.is_first_stage
    stage = GPTModel(cfg.model, layer_ids=[0] if first else [1], pre_process=first, post_process=not first)
    ctx = context_for(cfg, groups_of=ctx)
    groups = parameter_groups(stage, cfg.optim)
    parallel = build_parallel_training(ctx, stage, cfg, groups, bucket_numel=BUCKET, schedule=no_pipelining)
    g = torch.Generator().manual_seed(5)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in GPTModel(cfg.model).named_parameters()}
    head = torch.randn(grads["embedding.weight"].shape, generator=g)  # the output head's half
    for name, p in stage.named_parameters():
        p.main_grad.copy_((head if name == "lm_head.weight" else grads[name]) * (ctx.dp_rank + 1))
    parallel.hooks.finish_gradients(stage)
    mean = 1.5  # average of 1x and 2x over the two data ranks
    tied = mean * (grads.pop("embedding.weight") + head)
    expected = (tied.square().sum() + sum(mean**2 * t.square().sum() for t in grads.values())).sqrt()
    shared = stage.embedding.weight if first else stage.lm_head.weight
    buffer = parallel.optimizer.grad_buffer
    lo, hi = buffer.valid_range(shared)
    offset = buffer.layout.ranges[shared][0]
    return {
        "norm": parallel.optimizer.grad_norm().item(),
        "expected": expected.item(),
        "tied_synced": torch.allclose(
            buffer.data[lo:hi], tied.view(-1)[lo - offset : hi - offset], atol=1e-6
        ),
        "tied_elements": hi - lo,
    }


# --------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    trainer = reference_trainer(run_config(root), Tokens(), root)
    return {**train(trainer), "params": params_of(trainer.model), "state": trainer.optimizer.state_dict()}


def test_distributed_optimizer_equals_the_single_process_adamw(reference):
    for world_size in (2, 4):
        for got in results_of(world_size, __name__, "zero"):
            torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["grad_norm"], reference["grad_norm"], rtol=1e-5, atol=1e-6)
            assert_params_close(got["params"], reference["params"])


def test_each_rank_holds_a_disjoint_share_of_the_adam_state(reference):
    total = sum(p.numel() for p in reference["params"].values())
    for world_size in (2, 4):
        ranks = results_of(world_size, __name__, "zero")
        held = [r["bytes"]["exp_avg"] // 4 for r in ranks]  # fp32 elements
        assert sum(held) == total  # fragments tile every parameter exactly once
        for got, elements in zip(ranks, held):
            assert elements <= got["padded_numel"] // world_size
            assert got["bytes"]["exp_avg_sq"] == got["bytes"]["exp_avg"]
            assert got["bytes"]["master"] == 0  # fp32: the parameters are their own masters


def test_merged_shards_equal_the_plain_state_and_load_into_another_layout(reference, tmp_path):
    states = [r["state"] for r in results_of(2, __name__, "zero")]
    merged = merge_optimizer_states(states[::-1])  # any order
    for index, entry in reference["state"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                merged["state"][index][key], entry[key].reshape(-1), rtol=1e-4, atol=1e-7
            )
    cfg = run_config(tmp_path, SHARDED)
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    optimizer = build_parallel_training(
        context_for(cfg), model, cfg, parameter_groups(model, cfg.optim)
    ).optimizer
    optimizer.load_state_dict(merged)
    for index, entry in optimizer.state_dict()["state"].items():
        torch.testing.assert_close(entry["exp_avg"], merged["state"][index]["exp_avg"])
    with pytest.raises(ValueError, match="another data-parallel layout"):
        optimizer.load_state_dict(states[1])
    with pytest.raises(ValueError, match="gap or overlap"):
        merge_optimizer_states(states[:1])


def test_tensor_times_data_parallel_norm_counts_replicas_once(tmp_path):
    root = tmp_path / "ref"
    reference = reference_trainer(run_config(root, "model.num_kv_heads=1"), Tokens(), root)
    expected = {**train(reference, TP_STEPS), "params": params_of(reference.model)}
    cfg = run_config(root, "model.num_kv_heads=1").model
    for name in ("tp_dp_plain", "tp_dp_zero"):
        ranks = results_of(4, __name__, name)
        for got in ranks:
            torch.testing.assert_close(got["grad_norm"], expected["grad_norm"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
        # global rank = dp_rank * tp + tp_rank: ranks 0 and 1 are the tensor shards of data replica 0
        merged = {
            n: merge_param(n, [ranks[0]["params"][n], ranks[1]["params"][n]], cfg) for n in expected["params"]
        }
        assert_params_close(merged, expected["params"], rtol=1e-4, atol=1e-6)


def test_pipeline_norm_counts_the_tied_embedding_once():
    for got in results_of(4, __name__, "pp_dp"):
        for sharded, check in got.items():
            assert check["norm"] == pytest.approx(check["expected"], rel=1e-5), sharded
            assert check["tied_synced"] and check["tied_elements"] > 0, sharded


def test_shared_embedding_gets_its_own_aligned_bucket():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 300, 7)]
    layout = FlatLayout(
        [(str(i), p) for i, p in enumerate(params)], dp_size=4, bucket_numel=1000, own_bucket=[params[1]]
    )
    assert [len(b.params) for b in layout.buckets] == [1, 1, 1]
    shared = layout.bucket_of[params[1]]
    assert layout.ranges[params[1]][0] == shared.start  # shard offsets are the same on every stage
    assert all((b.stop - b.start) % (64 * 4) == 0 for b in layout.buckets)
