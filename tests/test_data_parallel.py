"""Data parallelism on gloo against the single-process trainer, plus the shared distributed harness.

Spawning ranks costs seconds, so the distributed checks of this file, test_distributed_optimizer.py,
test_mixed_precision.py and test_fully_sharded.py all run in one spawn per world size
(`distributed_results`, cached for the pytest session). Each file's
`distributed_checks(ctx_world_size, root)` runs on every rank and returns plain results; the tests
here compare them with single-process runs of the real Trainer.
Tolerances (fp32): losses and parameters rtol 1e-5 / atol 1e-6 after 10 steps (measured
differences are ~1e-7; they come from the order of floating-point sums).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import training_helpers
from hang_guard import HANG_GUARD_S

from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.parallel import ParallelContext, RankLayout
from megatron_andromeda.parallel.testing import DistributedTestError, run_distributed
from megatron_andromeda.training.trainer import Trainer

VOCAB, SEQ, STEPS, GLOBAL_BATCH = 64, 16, 10, 8
BUCKET = 2048  # elements: the tiny model spreads over ~20 buckets
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------------------------- harness
def Tokens(n: int = 256, seed: int = 0) -> training_helpers.Tokens:
    return training_helpers.Tokens(VOCAB, SEQ, n, seed)


def run_config(root: Path, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.vocab_size={VOCAB}",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=4",
            f"model.max_seq_length={SEQ}",
            "model.dropout=0.0",
            f"data.seq_length={SEQ}",
            "train.micro_batch_size=2",
            f"train.global_batch_size={GLOBAL_BATCH}",
            f"train.steps={STEPS}",
            "train.eval_interval=0",
            "optim.warmup_steps=2",
            "optim.lr=1e-2",
            "optim.min_lr=1e-3",
            "optim.clip_grad=0.5",  # below the early gradient norms: clipping is exercised
            f"logging.run_dir={root / 'run'}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def build_trainer(cfg: RunConfig, ctx: ParallelContext, data, root: Path, bucket: int = BUCKET):
    """This rank's Trainer as train.py builds it, on `ctx`'s process groups (small gradient buckets)."""
    ctx = training_helpers.context_for(cfg, groups_of=ctx)
    return training_helpers.product_trainer(cfg, data, root, ctx=ctx, bucket_numel=bucket)


reference_trainer = training_helpers.reference_trainer


def train(trainer: Trainer, steps: int = STEPS) -> dict[str, list[float]]:
    metrics = [trainer.train_step() for _ in range(steps)]
    return {k: [m[k] for m in metrics] for k in ("loss", "grad_norm", "skipped")}


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def assert_params_close(actual: dict, expected: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=name)


def _checks_on_rank(root: str) -> dict:
    import test_distributed_optimizer
    import test_fully_sharded
    import test_mixed_precision

    world_size = torch.distributed.get_world_size()
    rank_root = Path(root) / f"rank{torch.distributed.get_rank()}"
    modules = (sys.modules[__name__], test_distributed_optimizer, test_mixed_precision, test_fully_sharded)
    return {m.__name__: m.distributed_checks(world_size, rank_root / m.__name__) for m in modules}


@functools.cache
def distributed_results(world_size: int) -> list[dict]:
    """Every file's distributed checks on `world_size` gloo ranks, run once per session; one dict per rank."""
    with tempfile.TemporaryDirectory() as root:
        return run_distributed(_checks_on_rank, world_size, root=root)


def results_of(world_size: int, module: str, check: str) -> list:
    return [rank[module][check] for rank in distributed_results(world_size)]


# --------------------------------------------------------------------------------------------- on each rank
def distributed_checks(world_size: int, root: Path) -> dict:
    ctx = ParallelContext.build(RankLayout(tp=1, pp=1, dp=world_size))
    out = {"plain": _plain_run(ctx, root / "plain")}
    if world_size == 2:
        out["skip"] = _nan_on_one_rank(ctx, root / "skip")
        out["resume"] = _sharding_and_resume(ctx, root / "resume")
    return out


def _plain_run(ctx: ParallelContext, root: Path) -> dict:
    """10 steps of the replicated optimizer; logs how many buckets were reduced after each backward."""
    trainer, parallel = build_trainer(run_config(root), ctx, Tokens(), root)
    reduced_after_backward: list[list[int]] = []

    def schedule(forward_step, data_iterator, model, num_microbatches):
        parts, log = [], []
        for _ in range(num_microbatches):
            output, loss_fn = forward_step(data_iterator, model)
            loss, loss_parts = loss_fn(output)
            loss.backward()
            parts.append(loss_parts)
            log.append(parallel.optimizer.grad_buffer.num_reduced)
        reduced_after_backward.append(log)
        return parts

    trainer.hooks.schedule = schedule
    return {
        **train(trainer),
        "params": params_of(trainer.model),
        "reduced_after_backward": reduced_after_backward,
        "num_buckets": len(parallel.optimizer.grad_buffer.layout.buckets),
    }


def _nan_on_one_rank(ctx: ParallelContext, root: Path) -> dict:
    """Distributed optimizer: a NaN in rank 1's gradient shard only must stop the update on both ranks."""
    cfg = run_config(root, "parallel.distributed_optimizer=true", "train.max_consecutive_skips=2")
    trainer, parallel = build_trainer(cfg, ctx, Tokens(), root)
    train(trainer, 2)
    finish = trainer.hooks.finish_gradients

    def finish_then_poison(model):
        finish(model)
        if ctx.dp_rank == 1:
            parallel.optimizer.fragments[0].master.grad[0] = float("nan")

    params, state = params_of(trainer.model), _state_copy(parallel.optimizer)
    trainer.hooks.finish_gradients = finish_then_poison
    skipped = trainer.train_step()["skipped"]
    out = {
        "skipped": skipped,
        "skipped_steps": trainer.state.skipped_steps,
        "params_unchanged": all(torch.equal(p, params[n]) for n, p in params_of(trainer.model).items()),
        "state_unchanged": _same_state(_state_copy(parallel.optimizer), state),
    }
    try:
        trainer.train_step()  # the second skip in a row reaches train.max_consecutive_skips=2
    except RuntimeError as err:
        out["stop_message"] = str(err)
    trainer.hooks.finish_gradients = finish
    out["after"] = trainer.train_step()["skipped"]
    out["consecutive_after"] = trainer.state.consecutive_skips
    return out


def _state_copy(optimizer) -> dict:
    return {
        (i, k): v.clone() if torch.is_tensor(v) else v
        for i, e in optimizer.state_dict()["state"].items()
        for k, v in e.items()
    }


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
    )


def _sharding_and_resume(ctx: ParallelContext, root: Path) -> dict:
    """Sample ids each rank reads per step, straight through and across a save / resume at step 2."""
    steps = 4

    def run(trainer, data, n):
        ids, losses = [], []
        for _ in range(n):
            data.seen.clear()
            losses.append(trainer.train_step()["loss"])
            ids.append(sorted(data.seen))
        return ids, losses

    sharded = ("parallel.distributed_optimizer=true",)
    data = Tokens()
    straight, _ = build_trainer(run_config(root / "a", *sharded), ctx, data, root / "a")
    ids, losses = run(straight, data, steps)
    # Logs go under each rank's own root; a checkpoint is one directory that every rank writes into
    # (root is <tmp>/rank<r>/<module>/resume: the shared one sits beside the rank folders).
    shared_ckpt = root.parents[2] / "shared" / root.parent.name / root.name / "ckpt"
    save = f"checkpoint.save_dir={shared_ckpt}"
    first, _ = build_trainer(run_config(root / "b", *sharded, save), ctx, data, root / "b")
    run(first, data, 2)
    first.save()
    torch.manual_seed(999)  # resume must restore what it needs itself
    second, _ = build_trainer(run_config(root / "c", *sharded, save), ctx, data, root / "c")
    assert second.resume(shared_ckpt)
    resumed_ids, resumed_losses = run(second, data, steps - 2)
    return {
        "ids": ids,
        "losses": losses,
        "resumed_ids": resumed_ids,
        "resumed_losses": resumed_losses,
        "params_equal": all(
            torch.equal(p, q) for p, q in zip(straight.model.parameters(), second.model.parameters())
        ),
    }


# --------------------------------------------------------------------------------------------- tests
def _reference(tmp_path: Path) -> dict:
    trainer = reference_trainer(run_config(tmp_path), Tokens(), tmp_path)
    return {**train(trainer), "params": params_of(trainer.model)}


def test_data_parallel_equals_single_process(tmp_path):
    expected = _reference(tmp_path)
    assert max(expected["grad_norm"]) > 0.5  # the clip threshold: clipping is part of the comparison
    for world_size in (2, 4):
        for got in results_of(world_size, __name__, "plain"):
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(got["grad_norm"], expected["grad_norm"], rtol=RTOL, atol=ATOL)
            assert_params_close(got["params"], expected["params"])


def test_buckets_reduce_during_the_last_backward_only():
    for world_size in (2, 4):
        for got in results_of(world_size, __name__, "plain"):
            micro_batches = GLOBAL_BATCH // (2 * world_size)
            assert got["num_buckets"] > 1
            for log in got["reduced_after_backward"]:
                # nothing is reduced while gradients accumulate; every bucket is in flight before
                # finish_gradients, i.e. overlapped with the last backward pass
                assert log == [0] * (micro_batches - 1) + [got["num_buckets"]]


def test_nan_on_one_rank_skips_the_step_everywhere():
    for rank, got in enumerate(results_of(2, __name__, "skip")):
        assert got["skipped"] == 1.0 and got["skipped_steps"] == 1, rank
        assert got["params_unchanged"] and got["state_unchanged"], rank
        assert "2 consecutive steps had non-finite" in got["stop_message"], rank
        assert got["after"] == 0.0 and got["consecutive_after"] == 0, rank


def test_ranks_read_disjoint_samples_that_cover_the_batch_and_resume_identically():
    ranks = results_of(2, __name__, "resume")
    for step in range(4):
        per_rank = [set(r["ids"][step]) for r in ranks]
        assert not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == set(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
    for got in ranks:
        assert got["resumed_ids"] == got["ids"][2:]
        assert got["resumed_losses"] == got["losses"][2:]
        assert got["params_equal"]


# --------------------------------------------------------------------------------------------- a stalled rank
class _StallingTokens(training_helpers.Tokens):
    """Rank 1 stops answering once step 2 starts reading: it never reaches that step's reduction."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if torch.distributed.get_rank() == 1 and i >= GLOBAL_BATCH:
            time.sleep(HANG_GUARD_S)
        return super().__getitem__(i)


def _stalled_run(root: str) -> None:
    # 20 s: far above an honest step of this tiny model even on a loaded machine (the stall lasts hours)
    cfg = run_config(Path(root), "parallel.comm_timeout_s=20")
    trainer, _ = training_helpers.product_trainer(cfg, _StallingTokens(VOCAB, SEQ), Path(root))
    for _ in range(3):
        trainer.train_step()


def test_a_stalled_data_parallel_rank_is_named(tmp_path, capfd):
    """Issue 21: a data-parallel stall ended as gloo's raw timeout, not saying which rank stalled."""
    with pytest.raises(DistributedTestError, match="exited without a result"):
        run_distributed(_stalled_run, 2, root=str(tmp_path))
    err = capfd.readouterr().err
    assert "[rank 0] watchdog: no progress for" in err and "on step 2: gradient reduction" in err, err[-3000:]
    assert "ranks that have not reached it: rank 1 (last reached: step 1: skip decision)" in err, err[-3000:]
    assert "[rank 1] watchdog: rank 0 aborted the job" in err and "in __getitem__" in err  # its stack
