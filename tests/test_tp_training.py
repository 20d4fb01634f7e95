"""The real Trainer at tensor=2 (with sequence parallelism) on gloo trains like one process.

The tensor-parallel run is built the way train.py builds a run: `init_parallel` from torchrun-style
environment variables, then `train.build_training` (the one model builder, the parallel optimizer,
the loss that masks the padded vocabulary, the hooks). The reference is an unmodified model under
torch's AdamW with the same padding-masked loss. Clipping is below the early gradient norms, so the
global norm matters. fp32, 10 steps.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from training_helpers import product_trainer

from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.models.gpt import GPTModel, language_model_loss
from megatron_andromeda.parallel import init_parallel
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.training.optim import build_optimizer
from megatron_andromeda.training.trainer import Trainer

VOCAB, REAL_VOCAB, SEQ, STEPS = 256, 250, 16, 10


class Counting:
    """Samples with a learnable pattern (next = previous + 1) over the real vocabulary."""

    def __init__(self, n: int = 64):
        starts = torch.randint(0, REAL_VOCAB, (n,), generator=torch.Generator().manual_seed(0))
        self.data = (starts[:, None] + torch.arange(SEQ + 1)[None]) % REAL_VOCAB

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(SEQ)}


def run_config(root: str, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.vocab_size={VOCAB}",
            "model.hidden_size=64",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=1",
            f"model.max_seq_length={SEQ}",
            f"data.seq_length={SEQ}",
            "train.device=cpu",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            f"train.steps={STEPS}",
            "train.eval_interval=0",
            "optim.lr=1e-2",
            "optim.warmup_steps=2",
            "optim.clip_grad=0.5",
            f"logging.run_dir={root}/run",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def train(trainer: Trainer) -> dict[str, list[float]]:
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return {key: [m[key] for m in metrics] for key in ("loss", "grad_norm")}


def tensor_parallel_run(root: str) -> dict[str, list[float]]:
    cfg = run_config(root, "parallel.tensor=2", "parallel.sequence_parallel=true")
    ctx = init_parallel(cfg)
    trainer, _ = product_trainer(cfg, Counting(), Path(root), ctx=ctx, real_vocab_size=REAL_VOCAB)
    return train(trainer)


def reference_run(root: str) -> dict[str, list[float]]:
    cfg = run_config(root)
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    trainer = Trainer(
        cfg, model, build_optimizer(model, cfg.optim), Counting(), None,
        loss_fn=partial(language_model_loss, real_vocab_size=REAL_VOCAB), device=torch.device("cpu"),
        run_dir=Path(cfg.logging.run_dir),
    )  # fmt: skip
    return train(trainer)


def test_tensor_parallel_trainer_matches_one_process(tmp_path):
    ranks = run_distributed(tensor_parallel_run, 2, init_process_group=False, root=str(tmp_path / "tp"))
    reference = reference_run(str(tmp_path / "single"))
    assert reference["loss"][-1] < reference["loss"][0] - 0.5, "the reference run did not learn"
    assert reference["grad_norm"][0] > 0.5, "clipping was not exercised"
    for result in ranks:
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
