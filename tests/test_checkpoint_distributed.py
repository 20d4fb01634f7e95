"""Distributed checkpoints on 4 gloo processes: bitwise resume, async = sync, and loads across layouts.

One spawn runs every multi-rank case:
- tensor 2 x data 2 with the distributed optimizer and dropout: 6 steps straight against 3 steps,
  an async save, a fresh start and 3 more steps (bitwise); plus a sync and an async save of one
  state, compared byte for byte here;
- the same with an interleaved pipeline 2 x data 2 in bf16 (fp32 masters) and an untied head;
- tensor 2 x pipeline 2 trains 2 steps and saves; tensor 2 x data 2 (ZeRO-1) loads that checkpoint
  in the same spawn and one process loads it here: the logits and the next two steps' losses must
  match those of the saving layout (the second step checks the loaded Adam state).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import training_helpers
from hang_guard import HANG_GUARD_S

from megatron_andromeda.checkpoint import Checkpointer, Placement
from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.parallel import ParallelContext
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.training.optim import build_optimizer
from megatron_andromeda.training.trainer import Trainer

VOCAB, SEQ, HIDDEN = 128, 8, 32
TP2_DP2 = ["parallel.tensor=2", "parallel.data=2", "parallel.distributed_optimizer=true"]
TP2_PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]


def Tokens(n: int = 512) -> training_helpers.Tokens:
    return training_helpers.Tokens(VOCAB, SEQ, n)


def run_config(root: Path, *extra: str) -> RunConfig:
    return load_config(None, [
        f"model.vocab_size={VOCAB}", f"model.hidden_size={HIDDEN}", "model.num_layers=4", "model.num_heads=4",
        "model.num_kv_heads=1", f"model.max_seq_length={SEQ}", "model.dropout=0.0", f"data.seq_length={SEQ}",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=6", "train.eval_interval=0",
        "optim.warmup_steps=1", "optim.lr=1e-2", "optim.clip_grad=0.5", f"logging.run_dir={root / 'run'}",
        "logging.progress_bar=false", "logging.tensorboard=false", f"checkpoint.save_dir={root / 'ckpt'}",
        *extra,
    ])  # fmt: skip


def parallel_trainer(cfg: RunConfig) -> tuple[ParallelContext, Trainer]:
    """Every rank, as train.py builds it (train.build_training)."""
    ctx = training_helpers.context_for(cfg)
    torch.manual_seed(cfg.train.seed)
    trainer, _ = training_helpers.product_trainer(cfg, Tokens(), Path(cfg.logging.run_dir).parent, ctx=ctx)
    return ctx, trainer


def losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step()["loss"] for _ in range(steps)]


@torch.no_grad()
def full_logits(model: torch.nn.Module, ctx: ParallelContext, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits (B, T, V) gathered over the tensor group, on the last stage (None elsewhere)."""
    model.eval()
    if ctx.pp_size > 1:
        peer = ctx.layout.rank_of(1 - ctx.pp_rank, ctx.dp_rank, ctx.tp_rank)
        if ctx.is_first_stage:
            dist.send(model(tokens), dst=peer, group=ctx.pp_group)
            return None
        hidden = torch.empty(*tokens.shape, HIDDEN)
        dist.recv(hidden, src=peer, group=ctx.pp_group)
        model.set_input_tensor(hidden)
    logits = model(tokens)  # (B, T, V / tp)
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, logits, group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def probe() -> torch.Tensor:
    return Tokens(4).data[:, :SEQ]


# --------------------------------------------------------------------------------------------- on each rank
def bitwise_resume(root: Path) -> dict:
    cfg = run_config(root, *TP2_DP2, "model.dropout=0.1", "checkpoint.async_save=true")
    _, straight = parallel_trainer(cfg)
    expected = losses(straight, 6)
    ctx, first = parallel_trainer(cfg)
    got = losses(first, 3)
    first.save()  # in the background
    placement = Placement.from_context(ctx, sharded_optimizer=True)
    state = first.trainer_state()
    Checkpointer(cfg, placement, root=root / "sync").save(
        3, first.model, first.optimizer, state, blocking=True
    )
    background = Checkpointer(cfg, placement, root=root / "async")
    background.save(3, first.model, first.optimizer, state)
    losses(first, 1)  # changes every weight while the async saves may still be writing
    first.checkpointer.wait()
    background.wait()
    _, second = parallel_trainer(cfg)
    torch.manual_seed(999)  # the resume must restore every random state itself
    assert second.resume(root / "ckpt") and second.state.step == 3
    got += losses(second, 3)
    same = all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), second.model.parameters()))
    return {"expected": expected, "resumed": got, "same_parameters": same}


def interleaved_bf16_resume(root: Path) -> dict:
    """Chunk-prefixed names, an untied head on the last stage, bf16 weights with fp32 masters."""
    cfg = run_config(root, "parallel.pipeline=2", "parallel.data=2", "parallel.virtual_stages=2",
                     "parallel.distributed_optimizer=true", "train.precision=bf16",
                     "model.tie_embeddings=false")  # fmt: skip
    _, straight = parallel_trainer(cfg)
    expected = losses(straight, 4)
    _, first = parallel_trainer(cfg)
    got = losses(first, 2)
    first.save()
    _, second = parallel_trainer(cfg)
    assert second.resume(root / "ckpt")
    got += losses(second, 2)
    same = all(torch.equal(p, q) for p, q in zip(straight.model.parameters(), second.model.parameters()))
    return {"expected": expected, "resumed": got, "same_parameters": same}


def across_layouts(root: Path) -> dict:
    ctx, source = parallel_trainer(run_config(root / "source", *TP2_PP2))
    losses(source, 2)
    source.save()
    out = {"logits": full_logits(source.model, ctx, probe()), "next": losses(source, 2)}
    ctx, target = parallel_trainer(run_config(root / "target", *TP2_DP2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert target.resume(root / "source" / "ckpt") and target.state.step == 2
    out["rng_warning"] = any("random states not restored" in str(w.message) for w in caught)
    out["target_logits"] = full_logits(target.model, ctx, probe())
    out["target_next"] = losses(target, 2)
    return out


def checks_on_rank(root: str) -> dict:
    return {
        "resume": bitwise_resume(Path(root) / "resume"),
        "interleaved": interleaved_bf16_resume(Path(root) / "interleaved"),
        "layouts": across_layouts(Path(root) / "layouts"),
    }


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    """(the spawn's root directory, each rank's results): one spawn for the whole module."""
    root = tmp_path_factory.mktemp("distributed")
    return root, run_distributed(checks_on_rank, 4, root=str(root), timeout_s=HANG_GUARD_S)


# --------------------------------------------------------------------------------------------- tests
def test_tensor2_data2_resume_is_bitwise_identical(spawned):
    _, results = spawned
    for rank, result in enumerate(results):
        assert result["resume"]["resumed"] == result["resume"]["expected"], f"rank {rank}"
        assert result["resume"]["same_parameters"], f"rank {rank}"


def test_interleaved_pipeline_bf16_resume_is_bitwise_identical(spawned):
    root, results = spawned
    for rank, result in enumerate(results):
        assert result["interleaved"]["resumed"] == result["interleaved"]["expected"], f"rank {rank}"
        assert result["interleaved"]["same_parameters"], f"rank {rank}"
    meta = json.loads((root / "interleaved" / "ckpt" / "step_00000002" / "metadata.json").read_text())
    assert "model/lm_head.weight" in meta["tensors"] and not any(
        t.startswith("model/0.") for t in meta["tensors"]
    )
    assert meta["tensors"]["model/layers.3.mlp.down_proj.weight"]["dtype"] == "bfloat16"
    assert meta["tensors"]["optimizer/layers.3.mlp.down_proj.weight/master_param"]["dtype"] == "float32"


def test_async_and_sync_multi_rank_saves_are_byte_identical(spawned):
    root, _ = spawned
    sync, background = root / "resume" / "sync" / "step_00000003", root / "resume" / "async" / "step_00000003"
    names = sorted(p.name for p in sync.iterdir())
    assert names == sorted(p.name for p in background.iterdir())
    assert {f"rng-rank0000{r}.json" for r in range(4)} <= set(names)
    for name in names:
        assert (sync / name).read_bytes() == (background / name).read_bytes(), name


def test_every_value_is_written_exactly_once_by_its_owner(spawned):
    root, _ = spawned
    ckpt = root / "resume" / "ckpt" / "step_00000003"
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["layout"] == {
        "tensor": 2,
        "pipeline": 1,
        "data": 2,
        "world_size": 4,
        "sharded_optimizer": True,
    }
    writers = {"model": set(), "optimizer": set()}
    for tensor_id, entry in meta["tensors"].items():
        count = torch.zeros(entry["shape"])
        for piece in entry["pieces"]:
            count[tuple(slice(o, o + n) for o, n in zip(piece["offsets"], piece["shape"]))] += 1
            writers[tensor_id.split("/")[0]].add(piece["file"])
        assert torch.all(count == 1), f"{tensor_id} is not covered exactly once"
        if tensor_id.endswith("norm.weight"):  # replicated over the tensor group: tensor rank 0 only
            assert {p["file"] for p in entry["pieces"]} == {"model-rank00000.safetensors"}
    # weights from data rank 0 (ranks 0 and 1); ZeRO-1 fragments from every data rank
    assert writers["model"] == {"model-rank00000.safetensors", "model-rank00001.safetensors"}
    assert writers["optimizer"] == {f"optimizer-rank0000{r}.safetensors" for r in range(4)}


def test_tensor2_pipeline2_checkpoint_loads_at_tensor2_data2(spawned):
    _, results = spawned
    last_stage = [r["layouts"] for r in results if r["layouts"]["logits"] is not None]
    assert len(last_stage) == 2  # ranks 2 and 3
    for rank, result in enumerate(r["layouts"] for r in results):
        assert result["rng_warning"], f"rank {rank}: a resharding load must say the RNG was not restored"
        torch.testing.assert_close(result["target_logits"], last_stage[0]["logits"], rtol=1e-5, atol=1e-6)
        next_losses = torch.tensor(result["target_next"]), torch.tensor(result["next"])
        torch.testing.assert_close(*next_losses, rtol=1e-5, atol=0)


def test_tensor2_pipeline2_checkpoint_loads_in_one_process(spawned, tmp_path):
    root, results = spawned
    expected = next(r["layouts"] for r in results if r["layouts"]["logits"] is not None)
    cfg = run_config(tmp_path)
    model = GPTModel(cfg.model, init_seed=0)  # different weights until the checkpoint is loaded
    trainer = Trainer(
        cfg, model, build_optimizer(model, cfg.optim), Tokens(), None, loss_fn=language_model_loss,
        device=torch.device("cpu"), run_dir=tmp_path / "run",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="random states not restored"):
        assert trainer.resume(root / "layouts" / "source" / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(model(probe()), expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(losses(trainer, 2)), torch.tensor(expected["next"]), rtol=1e-5, atol=0
    )
