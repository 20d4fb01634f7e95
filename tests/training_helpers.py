"""What the training tests share: a learnable token dataset, and trainers built two ways.

`product_trainer` builds a rank's trainer exactly as `python -m megatron_andromeda.train` does
(train.build_training: the one model builder, the parallel optimizer, the hooks); `reference_trainer`
is the independent single-process baseline the distributed tests compare against: an unmodified
GPTModel, torch's own AdamW and the plain loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_andromeda.config import RunConfig
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.parallel import ParallelContext, plan_layout
from megatron_andromeda.parallel.data_parallel import DEFAULT_BUCKET_NUMEL
from megatron_andromeda.train import TrainingParts, build_training
from megatron_andromeda.training.optim import build_optimizer
from megatron_andromeda.training.trainer import Trainer


class Tokens:
    """Deterministic samples with a learnable pattern (next = previous + 1 mod vocab); records reads."""

    def __init__(self, vocab: int, seq: int, n: int = 256, seed: int = 0):
        starts = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
        self.data = (starts[:, None] + torch.arange(seq + 1)[None]) % vocab
        self.seq = seq
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.seen.append(i)
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq)}


def context_for(
    cfg: RunConfig, device: str = "cpu", groups_of: ParallelContext | None = None
) -> ParallelContext:
    """The context of a run of `cfg` over the current process group (one process when there is none).

    `groups_of`: reuse that context's process groups (same degrees), with `cfg`'s run layout.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = plan_layout(cfg, world)
    if groups_of is not None and not layout.fully_sharded:  # (full sharding also needs its device mesh)
        return dataclasses.replace(groups_of, layout=layout)
    if world == 1:
        return ParallelContext.single(device, seed=cfg.train.seed, layout=layout)
    return ParallelContext.build(layout, device=device, seed=cfg.train.seed)


def product_trainer(
    cfg: RunConfig,
    data,
    root: Path,
    *,
    ctx: ParallelContext | None = None,
    real_vocab_size: int | None = None,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
) -> tuple[Trainer, TrainingParts]:
    """The Trainer of this rank as the train entry point builds it."""
    ctx = ctx or context_for(cfg)
    parts = build_training(cfg, ctx, real_vocab_size or cfg.model.vocab_size, bucket_numel=bucket_numel)
    trainer = Trainer(
        cfg, parts.model, parts.optimizer, data, None, loss_fn=parts.loss_fn, device=ctx.device,
        run_dir=root / "run", hooks=parts.hooks, step_context=parts.step_context,
    )  # fmt: skip
    return trainer, parts


def reference_trainer(cfg: RunConfig, data, root: Path) -> Trainer:
    """The single-process baseline: an unmodified GPTModel under torch's AdamW and the plain loss."""
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    return Trainer(
        cfg, model, build_optimizer(model, cfg.optim), data, None, loss_fn=language_model_loss,
        device=torch.device("cpu"), run_dir=root / "run",
    )  # fmt: skip
