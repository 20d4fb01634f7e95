"""Full sharding (`parallel.data_sharding=full`, FSDP2) against one process, on gloo in fp32.

Runs in the shared spawns of test_data_parallel.py (2 and 4 ranks). Every trainer is built the
product way (training_helpers.product_trainer) and saves its last step; parameters are compared
through that checkpoint (read_model_state merges any layout), which also checks that a fully
sharded run writes every value exactly once. Tolerances as in test_data_parallel.py (fp32:
rtol 1e-5 / atol 1e-6 after 10 steps).

- 2 ranks: d = 2; a NaN on one rank leaves every shard and moment bit for bit; a bitwise resume
  (with dropout); checkpoints moving between none, optimizer and full (and to one process, and
  through tools/convert_to_hf.py); bf16 (fp32 shards as masters); an fp16 overflow on one rank.
- 4 ranks: d = 4; tensor 2 x data 2 with sequence parallelism and a KV head shared by both tensor
  ranks; pipeline 2 x data 2 under 1F1B, GPipe and the interleaved schedule (tied embedding across
  stages); HSDP 2 x 2; checkpoints moving between layouts and modes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import training_helpers
from test_data_parallel import (
    RTOL,
    STEPS,
    Tokens,
    assert_params_close,
    build_trainer,
    params_of,
    reference_trainer,
    results_of,
    run_config,
    train,
)
from tool_loader import load_tool

from megatron_andromeda.checkpoint import read_model_state
from megatron_andromeda.config import load_config
from megatron_andromeda.errors import ConfigError
from megatron_andromeda.hf.directory import load_hf_directory
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.fully_sharded import local_shard

FULL = "parallel.data_sharding=full"
ZERO = "parallel.data_sharding=optimizer"
TP2 = ("parallel.tensor=2", "parallel.sequence_parallel=true")  # run_config has one KV head: shared rows
PIPELINE_STEPS = 6
BATCH = ("train.micro_batch_size=1", "train.global_batch_size=8")  # for layouts checked without ranks
CASES_4 = {  # name: (overrides, steps)
    "d4": ((FULL,), STEPS),
    "tp2": ((FULL, *TP2), STEPS),
    "pp2_1f1b": ((FULL, "parallel.pipeline=2"), STEPS),
    "pp2_gpipe": ((FULL, "parallel.pipeline=2", "parallel.schedule=gpipe"), PIPELINE_STEPS),
    "pp2_interleaved": (
        (FULL, "parallel.pipeline=2", "parallel.virtual_stages=2", "model.num_layers=4"),
        PIPELINE_STEPS,
    ),
    "hsdp": ((FULL, "parallel.data_replicas=2"), STEPS),
}


# --------------------------------------------------------------------------------------------- helpers
def shared(root: Path) -> Path:
    """The directory every rank sees for `root` (<tmp>/rank<r>/... -> <tmp>/shared/...): checkpoints."""
    rank_dir = next(p for p in root.parents if p.name.startswith("rank"))
    return rank_dir.parent / "shared" / root.relative_to(rank_dir)


def trainer_for(root: Path, *extra: str, steps: int = STEPS):
    cfg = run_config(root, *extra, f"train.steps={steps}", f"checkpoint.save_dir={shared(root) / 'ckpt'}")
    torch.manual_seed(cfg.train.seed)  # (as train.py seeds every run: dropout masks start the same)
    return training_helpers.product_trainer(cfg, Tokens(), root)


def local_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's values of every parameter (its FSDP2 shard), copied."""
    return {n: local_shard(p)[0].clone() for n, p in model.named_parameters()}


def optimizer_tensors(optimizer) -> dict:
    return {
        (i, k): v.clone()
        for i, e in optimizer.state_dict()["state"].items()
        for k, v in e.items()
        if torch.is_tensor(v)
    }


def losses(trainer, steps: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


def saved_params(trainer) -> dict[str, torch.Tensor] | None:
    """Save the last step; rank 0 reads the checkpoint back as whole tensors (None elsewhere)."""
    path = trainer.save()
    dist.barrier()
    return read_model_state(path)[1] if dist.get_rank() == 0 else None


# --------------------------------------------------------------------------------------------- on each rank
def distributed_checks(world_size: int, root: Path) -> dict:
    if world_size == 2:
        return {
            "d2": train_case(root / "d2", FULL),
            "skip": nan_on_one_rank(root / "skip"),
            "resume": bitwise_resume(root / "resume"),
            "modes": between_modes(root / "modes"),
            "bf16": train_case(root / "bf16", FULL, "train.precision=bf16"),
            "fp16_overflow": fp16_overflow_on_rank_1(root / "fp16"),
        }
    out = {name: train_case(root / name, *extra, steps=steps) for name, (extra, steps) in CASES_4.items()}
    out["layouts"] = between_layouts(root / "layouts")
    return out


def train_case(root: Path, *extra: str, steps: int = STEPS) -> dict:
    trainer, parts = trainer_for(root, *extra, steps=steps)
    result = train(trainer, steps)
    held = sum(f.stop - f.start for f in parts.optimizer.fragments)
    return {
        **result,
        "valid": trainer.evaluate(Tokens(seed=1))["loss"],  # forward only, under no_grad
        "params": saved_params(trainer),
        "held": held,  # parameter elements whose shard (and moments) this rank holds
        "sharded": all(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
        "dtypes": {str(p.dtype) for p in trainer.model.parameters()},
        "replica": parts.optimizer.first_replica,
    }


def nan_on_one_rank(root: Path) -> dict:
    trainer, parts = trainer_for(root, FULL)
    train(trainer, 2)
    finish = trainer.hooks.finish_gradients

    def finish_then_poison(model):
        finish(model)
        if dist.get_rank() == 1:
            parts.optimizer.fragments[0].master.grad[0] = float("nan")

    params, state = local_values(trainer.model), optimizer_tensors(parts.optimizer)
    trainer.hooks.finish_gradients = finish_then_poison
    skipped = trainer.train_step()["skipped"]
    after_params, after_state = local_values(trainer.model), optimizer_tensors(parts.optimizer)
    trainer.hooks.finish_gradients = finish
    return {
        "skipped": skipped,
        "params_unchanged": all(torch.equal(after_params[n], v) for n, v in params.items()),
        "state_unchanged": after_state.keys() == state.keys()
        and all(torch.equal(after_state[k], v) for k, v in state.items()),
        "next_skipped": trainer.train_step()["skipped"],
    }


def bitwise_resume(root: Path) -> dict:
    extra = (FULL, "model.dropout=0.1")
    straight, _ = trainer_for(root / "a", *extra, steps=4)
    expected = losses(straight, 4)
    first, _ = trainer_for(root / "b", *extra, steps=4)
    got = losses(first, 2)
    first.save()
    torch.manual_seed(999)  # the resume must restore every random state itself
    second, _ = trainer_for(root / "b", *extra, steps=4)
    assert second.resume(shared(root / "b") / "ckpt")
    got += losses(second, 2)
    a, b = local_values(straight.model), local_values(second.model)
    return {"expected": expected, "resumed": got, "same_parameters": all(torch.equal(a[n], b[n]) for n in a)}


def continued(source_root: Path, source: tuple[str, ...], targets: dict[str, tuple[str, ...]]) -> dict:
    """Train `source` 2 steps, save, then 2 more; each target resumes the save and trains 2 steps."""
    trainer, _ = trainer_for(source_root, *source, steps=4)
    losses(trainer, 2)
    trainer.save()
    out = {"next": losses(trainer, 2)}
    for name, extra in targets.items():
        target, _ = trainer_for(source_root / name, *extra, steps=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random states are not restored across layouts: said aloud
            assert target.resume(shared(source_root) / "ckpt") and target.state.step == 2
        out[name] = losses(target, 2)
    return out


def between_modes(root: Path) -> dict:
    out = {
        "from_full": continued(root / "full", (FULL,), {"to_none": (), "to_optimizer": (ZERO,)}),
        "from_optimizer": continued(root / "zero", (ZERO,), {"to_full": (FULL,)}),
        "from_none": continued(root / "none", (), {"to_full": (FULL,)}),
    }
    dist.barrier()
    if dist.get_rank() == 0:  # one process and the Hugging Face export read the full checkpoint
        ckpt = shared(root / "full") / "ckpt"
        single = reference_trainer(run_config(root / "single", "train.steps=4"), Tokens(), root / "single")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert single.resume(ckpt)
        out["from_full"]["to_one_process"] = losses(single, 2)
        convert = load_tool("convert_to_hf")
        assert convert.main(["--checkpoint", str(ckpt), "--output", str(root / "hf")]) == 0
        out["hf"] = load_hf_directory(root / "hf")[1]
        out["checkpoint"] = read_model_state(ckpt)[1]
    return out


def between_layouts(root: Path) -> dict:
    """tensor 2 x data 2 (full) -> pipeline 2 x data 2 (ZeRO-1); tensor 2 x pipeline 2 -> data 4 (full)."""
    return {
        "tp2_full": continued(
            root / "tp2_full", (FULL, *TP2), {"to_pp2_zero": (ZERO, "parallel.pipeline=2")}
        ),
        "tp2pp2_none": continued(root / "tp2pp2", (*TP2, "parallel.pipeline=2"), {"to_d4_full": (FULL,)}),
    }


def fp16_overflow_on_rank_1(root: Path) -> dict:
    trainer, parts = trainer_for(root, FULL, "train.precision=fp16")
    finish = trainer.hooks.finish_gradients

    def finish_then_overflow(model):
        finish(model)
        if dist.get_rank() == 1:
            parts.optimizer.fragments[-1].master.grad[-1] = float("inf")

    train(trainer, 1)
    before, scale = local_values(trainer.model), trainer.hooks.loss_scaler.get_scale()
    trainer.hooks.finish_gradients = finish_then_overflow
    trainer.train_step()
    after = local_values(trainer.model)
    return {
        "scales": [scale, trainer.hooks.loss_scaler.get_scale()],
        "unchanged": all(torch.equal(after[n], v) for n, v in before.items()),
    }


# --------------------------------------------------------------------------------------------- references
def reference(tmp_path: Path, *extra: str, steps: int = STEPS) -> dict:
    model_args = [x for x in extra if not x.startswith("parallel.")]
    trainer = reference_trainer(run_config(tmp_path, *model_args, f"train.steps={steps}"), Tokens(), tmp_path)
    result = train(trainer, steps)
    return {**result, "params": params_of(trainer.model), "valid": trainer.evaluate(Tokens(seed=1))["loss"]}


def assert_matches(got: dict, expected: dict, rank: int, rtol: float = RTOL, atol: float = 1e-6) -> None:
    for key in ("loss", "grad_norm", "valid"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(expected[key]), rtol=rtol, atol=atol,
            msg=lambda m, k=key: f"rank {rank} {k}: {m}",
        )  # fmt: skip
    if got["params"] is not None:
        assert_params_close(got["params"], expected["params"], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world_size", [2, 4])
def test_full_sharding_equals_one_process(world_size, tmp_path):
    case = "d2" if world_size == 2 else "d4"
    expected = reference(tmp_path, FULL)
    assert max(expected["grad_norm"]) > 0.5  # clipping (optim.clip_grad=0.5) is part of the comparison
    ranks = results_of(world_size, __name__, case)
    total = sum(p.numel() for p in expected["params"].values())
    assert sum(r["held"] for r in ranks) == total  # the shards tile every parameter once
    for rank, got in enumerate(ranks):
        assert got["sharded"] and got["dtypes"] == {"torch.float32"}
        assert got["held"] <= 1.1 * total / world_size, (got["held"], total)
        assert_matches(got, expected, rank)


@pytest.mark.parametrize("case", [c for c in CASES_4 if c != "d4"])
def test_full_sharding_with_tensor_pipeline_and_hsdp_equals_one_process(case, tmp_path):
    extra, steps = CASES_4[case]
    expected = reference(tmp_path, *extra, steps=steps)
    ranks = results_of(4, __name__, case)
    for rank, got in enumerate(ranks):
        assert_matches(got, expected, rank)
    if case == "hsdp":  # global rank = dp rank; replicas {0, 1} and {2, 3}: the second holds copies
        assert [r["replica"] for r in ranks] == [True, True, False, False]
        assert ranks[0]["held"] + ranks[1]["held"] == ranks[2]["held"] + ranks[3]["held"]


def test_bf16_full_sharding_keeps_fp32_shards_and_matches_bf16_one_process(tmp_path):
    """Against the one-process trainer of bf16 weights and fp32 masters (test_mixed_precision.py)."""
    cfg = run_config(tmp_path, "train.precision=bf16")
    trainer, _ = build_trainer(cfg, ParallelContext.single(), Tokens(), tmp_path)
    expected = {**train(trainer), "params": params_of(trainer.model)}
    for got in results_of(2, __name__, "bf16"):
        assert got["dtypes"] == {"torch.float32"}  # the shards are the masters; compute is bf16
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=2e-3, atol=2e-3)
        if got["params"] is not None:
            assert_params_close(got["params"], expected["params"], rtol=2e-2, atol=2e-3)


def test_nan_on_one_rank_leaves_every_shard_and_moment_bitwise_unchanged():
    for rank, got in enumerate(results_of(2, __name__, "skip")):
        assert got["skipped"] == 1.0 and got["next_skipped"] == 0.0, rank
        assert got["params_unchanged"] and got["state_unchanged"], rank


def test_fp16_overflow_on_one_rank_skips_and_backs_off_everywhere():
    for rank, got in enumerate(results_of(2, __name__, "fp16_overflow")):
        assert got["unchanged"], rank
        assert got["scales"][1] == got["scales"][0] / 2, rank


def test_full_sharding_resume_is_bitwise_identical():
    for rank, got in enumerate(results_of(2, __name__, "resume")):
        assert got["resumed"] == got["expected"], rank
        assert got["same_parameters"], rank


def test_checkpoints_move_between_none_optimizer_and_full():
    ranks = results_of(2, __name__, "modes")
    for rank, got in enumerate(ranks):
        for source, moves in got.items():
            if source in ("hf", "checkpoint"):
                continue
            for target, values in moves.items():
                if target != "next":
                    torch.testing.assert_close(
                        torch.tensor(values), torch.tensor(moves["next"]), rtol=1e-5, atol=0,
                        msg=lambda m, r=rank, s=source, t=target: f"rank {r} {s} -> {t}: {m}",
                    )  # fmt: skip
    assert "to_one_process" in ranks[0]["from_full"]
    exported, stored = ranks[0]["hf"], ranks[0]["checkpoint"]
    assert exported.keys() == stored.keys()
    for name, value in stored.items():
        torch.testing.assert_close(exported[name], value.float(), rtol=0, atol=0, msg=name)


def test_checkpoints_move_between_layouts_and_modes():
    for rank, got in enumerate(results_of(4, __name__, "layouts")):
        for source, moves in got.items():
            for target in moves.keys() - {"next"}:
                torch.testing.assert_close(
                    torch.tensor(moves[target]), torch.tensor(moves["next"]), rtol=1e-5, atol=0,
                    msg=lambda m, r=rank, s=source, t=target: f"rank {r} {s} -> {t}: {m}",
                )  # fmt: skip


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("world", "extra", "fields"),
    [
        (4, ("parallel.data_replicas=2",), ("parallel.data_replicas", "parallel.data_sharding=full")),
        (4, (FULL, "parallel.data_replicas=3"), ("parallel.data_replicas=3", "parallel.data")),
        (4, (FULL, "parallel.data_replicas=4"), ("parallel.data_replicas=4", "at least 2 ranks")),
        (
            2,
            (FULL, "parallel.distributed_optimizer=true"),
            ("parallel.distributed_optimizer", "data_sharding=full"),
        ),
        (4, (FULL, "backend.fp8=delayed", "backend.linear=te"), ("backend.fp8", "parallel.data_sharding")),
    ],
)
def test_impossible_sharding_is_one_config_error_before_any_process_group(world, extra, fields, tmp_path):
    assert not dist.is_initialized()
    with pytest.raises(ConfigError) as caught:
        plan_layout(load_config(None, [*BATCH, *extra]), world)
    for field in fields:
        assert field in str(caught.value), (field, str(caught.value))
    assert not dist.is_initialized()


def test_the_old_distributed_optimizer_flag_is_the_optimizer_mode():
    old = plan_layout(load_config(None, [*BATCH, "parallel.distributed_optimizer=true"]), 2)
    new = plan_layout(load_config(None, [*BATCH, ZERO]), 2)
    assert old.data_sharding == new.data_sharding == "optimizer" and old.distributed_optimizer
    one = plan_layout(load_config(None, [*BATCH, FULL]), 1)
    assert one.data_sharding == "none"  # one data rank: nothing to shard, the plain path
    hsdp = plan_layout(load_config(None, [*BATCH, FULL, "parallel.data_replicas=2"]), 8)
    assert hsdp.dp_shard_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hsdp.dp_replicate_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [hsdp.data_coords(r) for r in (0, 3, 4, 7)] == [(0, 0), (0, 3), (1, 0), (1, 3)]
