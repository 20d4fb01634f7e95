"""3D parallelism: tensor 2 x pipeline 2 x data 2 on 8 gloo processes against one process.

The real Trainer, built as train.py builds it, runs 10 steps with the parallel package's optimizer,
hooks and pipeline schedule; the single-process baseline is the Trainer with torch's AdamW. Losses and
gradient norms (clipping is active, so the tied embedding must be counted once) must agree within
rtol 1e-5 / atol 1e-6. One spawn runs both cases: 1F1B with sequence parallelism and full
recomputation, and the interleaved schedule with selective recomputation.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
import training_helpers
from hang_guard import HANG_GUARD_S

from megatron_andromeda.config import RunConfig, load_config
from megatron_andromeda.parallel.testing import run_distributed
from megatron_andromeda.training.trainer import Trainer

VOCAB, SEQ, STEPS = 64, 8, 10
RTOL, ATOL = 1e-5, 1e-6
LAYOUT = dict(tensor=2, pipeline=2, data=2)
CASES = {
    "1f1b": [
        "model.block=parallel",
        "parallel.sequence_parallel=true",
        "parallel.recompute=full",
    ],
    # Interleaved ranks hold an nn.ModuleList, whose parameter names start with the chunk index;
    # decaying every matrix keeps optimizer groups independent of names (see the report to the lead).
    "interleaved": [
        "model.block=sequential",
        "model.activation=gelu",
        "model.position_embedding=alibi",
        "model.num_kv_heads=2",
        "parallel.virtual_stages=2",
        "parallel.recompute=selective",
        "optim.decay_norms_and_embeddings=true",
    ],
}


def Tokens(n: int = 512) -> training_helpers.Tokens:
    return training_helpers.Tokens(VOCAB, SEQ, n)


def run_config(root: Path, case: str, parallel: bool) -> RunConfig:
    layout = [f"parallel.{k}={v}" for k, v in LAYOUT.items()] if parallel else []
    extra = [x for x in CASES[case] if parallel or not x.startswith("parallel.")]
    return load_config(
        None,
        [
            f"model.vocab_size={VOCAB}",
            "model.hidden_size=32",
            "model.num_layers=4",
            "model.num_heads=4",
            f"model.max_seq_length={SEQ}",
            "model.dropout=0.0",
            f"data.seq_length={SEQ}",
            "train.micro_batch_size=2",
            "train.global_batch_size=16",  # 4 micro-batches per data-parallel rank
            f"train.steps={STEPS}",
            "train.eval_interval=0",
            "optim.warmup_steps=2",
            "optim.lr=1e-2",
            "optim.min_lr=1e-3",
            "optim.clip_grad=0.5",  # below the early gradient norms: clipping is exercised
            f"logging.run_dir={root / 'run'}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *layout,
            *extra,
        ],
    )


def train(trainer: Trainer) -> dict[str, list[float]]:
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return {key: [m[key] for m in metrics] for key in ("loss", "grad_norm")}


def three_d_run(root: Path, case: str) -> dict[str, list[float]]:
    """This rank's trainer as train.py builds it (train.build_training)."""
    cfg = run_config(root, case, parallel=True)
    trainer, _ = training_helpers.product_trainer(cfg, Tokens(), root)
    return train(trainer)


def checks_on_rank(root: str) -> dict:
    rank_root = Path(root) / f"rank{torch.distributed.get_rank()}"
    return {case: three_d_run(rank_root / case, case) for case in CASES}


@functools.cache
def spawn_results() -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        return run_distributed(checks_on_rank, 8, root=root, timeout_s=HANG_GUARD_S)


def reference(root: Path, case: str) -> dict[str, list[float]]:
    cfg = run_config(root, case, parallel=False)
    return train(training_helpers.reference_trainer(cfg, Tokens(), root))


@pytest.mark.parametrize("case", list(CASES))
def test_3d_matches_single_process(case, tmp_path):
    expected = reference(tmp_path, case)
    assert expected["loss"][-1] < expected["loss"][0] - 0.5, "the baseline did not learn: too weak a test"
    for rank, result in enumerate(spawn_results()):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(
                torch.tensor(result[case][key]), torch.tensor(expected[key]), rtol=RTOL, atol=ATOL,
                msg=lambda m, k=key, r=rank: f"{case} rank {r} {k}: {m}",
            )  # fmt: skip
