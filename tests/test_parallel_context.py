"""Rank layout, layout validation (no process group) and the groups a ParallelContext builds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hang_guard import HANG_GUARD_S

from megatron_andromeda.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from megatron_andromeda.models.presets import get_preset
from megatron_andromeda.parallel import (
    ParallelContext,
    RankLayout,
    init_parallel,
    padded_vocab_size,
    validate_layout,
)
from megatron_andromeda.parallel.testing import DistributedTestError, run_distributed


def test_megatron_order_tensor_fastest_then_data_then_pipeline():
    layout = RankLayout(tp=2, pp=2, dp=2)
    assert layout.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.stage_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.coords(5) == (1, 0, 1)  # (pp, dp, tp)
    assert RankLayout(tp=1, pp=4, dp=1).embedding_groups() == [[0, 3]]


@pytest.mark.parametrize(("tp", "pp", "dp"), [(1, 1, 1), (4, 1, 2), (2, 3, 2), (8, 2, 1)])
def test_every_kind_of_group_partitions_the_world(tp, pp, dp):
    layout = RankLayout(tp=tp, pp=pp, dp=dp)
    for rank in range(layout.world_size):
        assert layout.rank_of(*layout.coords(rank)) == rank
    for groups, size in (
        (layout.tp_groups(), tp),
        (layout.dp_groups(), dp),
        (layout.pp_groups(), pp),
        (layout.model_parallel_groups(), tp * pp),
        (layout.stage_groups(), tp * dp),
    ):
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        assert all(len(g) == size for g in groups)


def test_describe_lists_the_groups():
    text = RankLayout(tp=2, pp=1, dp=2).describe()
    assert "world 4 = tensor 2 x data 2 x pipeline 1" in text
    assert "tensor groups:          [0, 1] [2, 3]" in text


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(50257, 2) == 50432
    assert padded_vocab_size(50304, 4) == 50688
    assert padded_vocab_size(256, 2) == 256


def test_valid_layouts_for_the_presets():
    model = get_preset("andromeda-1b")
    for tp in (1, 2, 4, 8, 16):
        assert validate_layout(ParallelConfig(tensor=tp), model, 16).dp == 16 // tp
    assert validate_layout(ParallelConfig(tensor=2, pipeline=2), model, 8) == RankLayout(tp=2, pp=2, dp=2)


@pytest.mark.parametrize(
    ("parallel", "model", "world", "message"),
    [
        (
            dict(tensor=3),
            dict(num_heads=8, hidden_size=64),
            3,
            "model.num_heads=8 is not divisible by parallel.tensor=3",
        ),
        (dict(tensor=4), {}, 6, "world size 6 is not divisible by parallel.tensor=4"),
        (dict(tensor=2, data=3), {}, 8, "= 6 != world size 8"),
        (dict(tensor=2), dict(num_heads=6, num_kv_heads=3, hidden_size=60), 2, "model.num_kv_heads=3"),
        (dict(tensor=8), dict(ffn_hidden_size=100), 8, "model.ffn_hidden_size=100 is not divisible"),
        (dict(tensor=2), dict(vocab_size=50257), 2, "set model.vocab_size=50432"),
        (dict(pipeline=4), dict(num_layers=2), 4, "parallel.pipeline=4 exceeds model.num_layers=2"),
        (dict(tensor=0), {}, 1, "parallel.tensor=0 must be positive"),
    ],
)
def test_invalid_layouts_fail_before_any_process_group(parallel, model, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_layout(ParallelConfig(**parallel), ModelConfig(**model), world)
    assert not dist.is_initialized()


def test_sequence_parallel_needs_divisible_sequence():
    with pytest.raises(ConfigError, match="data.seq_length=15 must be a multiple of 2"):
        validate_layout(ParallelConfig(tensor=2, sequence_parallel=True), ModelConfig(), 2, seq_length=15)


def test_single_context(capsys):
    ctx = ParallelContext.single()
    assert (ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.world_size) == (1, 1, 1, 1)
    assert (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank) == (0, 0, 0)
    assert ctx.is_first_stage and ctx.is_last_stage and not ctx.distributed
    assert ctx.tp_group is None and ctx.mp_group is None
    ctx.print_layout()
    assert "world 1 = tensor 1 x data 1 x pipeline 1" in capsys.readouterr().out


def test_init_parallel_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = RunConfig()
    cfg.train.device = "cpu"
    ctx = init_parallel(cfg)
    assert ctx.world_size == 1 and not dist.is_initialized()


def test_init_parallel_rejects_a_bad_layout_before_init(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    cfg = RunConfig()
    cfg.parallel.tensor = 4
    with pytest.raises(ConfigError, match="world size 6"):
        init_parallel(cfg)
    assert not dist.is_initialized()


# --------------------------------------------------------------------------------------------- 4 processes
def groups_worker() -> dict:
    """init_parallel from torchrun-style env (tp=2, pp=2), then a second layout (tp=2, dp=2)."""
    cfg = RunConfig()
    cfg.train.device = "cpu"
    cfg.parallel.tensor, cfg.parallel.pipeline = 2, 2
    cfg.model.num_layers = 2
    first = init_parallel(cfg)
    second = ParallelContext.build(RankLayout(tp=2, pp=1, dp=2))
    out = {}
    for label, ctx in (("tp2pp2", first), ("tp2dp2", second)):
        sums = {}
        for kind in ("tp", "dp", "pp", "embedding", "mp", "stage"):
            value = torch.tensor([float(dist.get_rank())])
            dist.all_reduce(value, group=getattr(ctx, f"{kind}_group"))
            sums[kind] = value.item()
        coords = (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank, ctx.is_first_stage, ctx.is_last_stage)
        out[label] = {"sums": sums, "coords": coords}
    return out


def failing_worker() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()


def test_groups_match_the_layout():
    results = run_distributed(groups_worker, 4, init_process_group=False)
    for label, layout in (("tp2pp2", RankLayout(tp=2, pp=2, dp=1)), ("tp2dp2", RankLayout(tp=2, pp=1, dp=2))):
        groups = {
            "tp": layout.tp_groups(),
            "dp": layout.dp_groups(),
            "pp": layout.pp_groups(),
            "embedding": layout.embedding_groups(),
            "mp": layout.model_parallel_groups(),
            "stage": layout.stage_groups(),
        }
        for rank, result in enumerate(results):
            for kind, members in groups.items():
                mine = next(g for g in members if rank in g)
                assert result[label]["sums"][kind] == sum(mine), (label, rank, kind)
            pp, dp, tp = layout.coords(rank)
            assert result[label]["coords"] == (tp, dp, pp, pp == 0, pp == layout.pp - 1)


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(DistributedTestError, match="rank 1 failed:(.|\n)*rank one is unhappy"):
        run_distributed(failing_worker, 2, timeout_s=HANG_GUARD_S)
