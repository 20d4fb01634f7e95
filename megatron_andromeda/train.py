"""Entry point: `python -m megatron_andromeda.train --config FILE [section.key=value ...]`.

Reads like a recipe: config -> parallel context -> tokenizer and data -> model -> optimizer ->
trainer. Works unchanged under `torchrun` (one process per device).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_andromeda.backends import (
    BackendChoice,
    apply_backends,
    fp8_context,
    loss_function,
    select_backends,
)
from megatron_andromeda.checkpoint import Placement, load_model_weights
from megatron_andromeda.config import ConfigError, DataConfig, RunConfig, load_config, save_resolved_config
from megatron_andromeda.data.builder import build_datasets, parse_blend
from megatron_andromeda.data.recipe import resolve_data_config
from megatron_andromeda.models import GPTModel
from megatron_andromeda.parallel import ParallelContext, init_parallel, make_loss_fn, validate_layout
from megatron_andromeda.parallel.hooks import build_parallel_training
from megatron_andromeda.parallel.pipeline import (
    build_pipeline_model,
    build_pipeline_schedule,
    check_pipeline_config,
    sync_tied_embedding_weights,
)
from megatron_andromeda.parallel.recompute import apply_recompute
from megatron_andromeda.training.checkpoint import read_model_state, resolve_checkpoint
from megatron_andromeda.training.optim import build_optimizer
from megatron_andromeda.training.stages import plan_stages
from megatron_andromeda.training.trainer import ParallelHooks, Trainer, TrainState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_andromeda.train",
        description="Train an Andromeda (PaLM / MPT-style) decoder.",
        epilog="Overrides use dotted keys, e.g. model=andromeda-100m model.num_layers=4 train.steps=100",
    )
    parser.add_argument("--config", type=str, default=None, help="YAML run config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> TrainState:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    return run(cfg)


def run(cfg: RunConfig) -> TrainState:
    """Train with a validated config (every stage in order, for a multi-stage run)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(cfg.parallel, cfg.model, world_size, cfg.data.seq_length)
    check_pipeline_config(cfg, layout.dp)  # both before any process group exists
    ctx = init_parallel(cfg)
    try:
        if not cfg.stages:
            return run_stage(cfg, ctx)
        state = TrainState()
        for plan in plan_stages(cfg):
            if ctx.rank == 0:
                print(f"=== stage {plan.label}: {plan.config.train.steps} steps", flush=True)
            state = run_stage(plan.config, ctx, plan.stage.freeze, plan.lr_step_offset, plan.lr_total_steps)
        return state
    finally:
        ctx.close()


def run_stage(
    cfg: RunConfig,
    ctx: ParallelContext,
    freeze: Sequence[str] = (),
    lr_step_offset: int = 0,
    lr_total_steps: int | None = None,
) -> TrainState:
    """One training run: resumes from its own checkpoints when they exist."""
    _check_inputs(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.logging.run_dir)
    if ctx.rank == 0:
        save_resolved_config(cfg, run_dir)

    tokenizer = _load_tokenizer(cfg)
    data_cfg = resolve_data_config(cfg.data)
    train_data, valid_data = _build_data(cfg, data_cfg, tokenizer)
    parts = build_training(cfg, ctx, tokenizer.vocab_size, freeze)
    trainer = Trainer(
        cfg, parts.model, parts.optimizer, train_data, valid_data,
        loss_fn=parts.loss_fn, device=ctx.device, run_dir=run_dir, hooks=parts.hooks,
        lr_step_offset=lr_step_offset, lr_total_steps=lr_total_steps,
        step_context=lambda: fp8_context(parts.backends),
    )  # fmt: skip
    trainer.logger.print(f"backends: {parts.backends.describe()}")
    resume_from = cfg.checkpoint.load_dir or cfg.checkpoint.save_dir
    if not (resume_from and trainer.resume(resume_from)):
        total = sum(p.numel() for p in parts.model.parameters())
        trainer.logger.print(f"model {cfg.model.name}: {total:,} parameters on this rank"
                             + (f", {parts.frozen:,} frozen" if parts.frozen else ""))  # fmt: skip
    state = trainer.fit()
    if ctx.rank == 0:
        write_data_report(run_dir, data_cfg, train_data, state.consumed_samples, cfg.data.seq_length)
    trainer.logger.close()
    return state


@dataclass
class TrainingParts:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: ParallelHooks
    loss_fn: Callable
    backends: BackendChoice
    frozen: int


def build_training(cfg: RunConfig, ctx: ParallelContext, real_vocab_size: int, freeze: Sequence[str] = ()):
    """Model (sharded for this rank), kernels, optimizer, loss and loop hooks.

    One process keeps plain fp32 parameters under torch's AdamW (autocast for bf16); several
    processes go through parallel/: tensor sharding, bucketed gradient reduction overlapped with
    backward, the replicated or ZeRO-1 optimizer with fp32 master weights.
    """
    if ctx.distributed:
        model = build_pipeline_model(cfg, ctx)  # this rank's stage(s), tensor-sharded, recompute applied
        if cfg.train.init_from:  # any saved layout: each rank reads the slices it holds
            load_model_weights(cfg.train.init_from, model, Placement.from_context(ctx))
            sync_tied_embedding_weights(model, ctx)
    else:
        model = apply_recompute(build_model(cfg), cfg.parallel.recompute).to(ctx.device)
    backends = select_backends(cfg.backend, ctx.device, precision=cfg.train.precision,
                               tensor_parallel=cfg.parallel.tensor)  # fmt: skip
    apply_backends(model, backends)  # new modules: before the optimizer sees the parameters
    frozen = freeze_parameters(model, freeze)
    if backends.cross_entropy == "flash" and ctx.tp_size == 1:
        loss_fn = loss_function(backends)
    else:
        loss_fn = make_loss_fn(ctx, real_vocab_size=real_vocab_size)  # padding ids masked out
    if not ctx.distributed:
        return TrainingParts(
            model, build_optimizer(model, cfg.optim), ParallelHooks(), loss_fn, backends, frozen
        )
    schedule = build_pipeline_schedule(ctx, cfg) if ctx.pp_size > 1 else None
    parallel = build_parallel_training(ctx, model, cfg, schedule=schedule)
    parallel.hooks.loss_scaler = parallel.loss_scaler
    return TrainingParts(model, parallel.optimizer, parallel.hooks, loss_fn, backends, frozen)


def freeze_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> int:
    """Stop training the parameters whose names match any fnmatch pattern; returns how many elements."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            p.requires_grad_(False)
            frozen += p.numel()
    if patterns and not frozen:
        raise ConfigError(
            f"freeze patterns {list(patterns)} match no parameter (names look like "
            "'layers.0.attn.qkv_proj.weight', 'embedding.weight')"
        )
    return frozen


def write_data_report(run_dir: Path, data_cfg, train_data, consumed: int, seq_length: int) -> Path:
    """What this run trained on: samples and tokens per source, from the blend's own index."""
    blend = parse_blend(data_cfg.train, "data.train")
    counts = train_data.source_counts(consumed) if hasattr(train_data, "source_counts") else [consumed]
    sources = [
        {"dataset": prefix, "weight": weight, "samples": int(n), "tokens": int(n) * seq_length}
        for (weight, prefix), n in zip(blend, counts)
    ]
    path = run_dir / "data_report.json"
    path.write_text(json.dumps({"consumed_samples": consumed, "sources": sources}, indent=2))
    return path


def build_model(cfg: RunConfig) -> GPTModel:
    """The full model with weights drawn from the run's seed, or loaded from `train.init_from`."""
    model = GPTModel(cfg.model, init_seed=cfg.train.seed)
    if cfg.train.init_from:
        _, state = read_model_state(cfg.train.init_from)
        model.load_state_dict(state)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _check_inputs(cfg: RunConfig) -> None:
    """File-level checks that must fail before anything starts."""
    if not cfg.data.tokenizer:
        raise ConfigError(
            "data.tokenizer is not set: give a tokenizer.json or SentencePiece .model file "
            "(tools/train_tokenizer.py makes one)"
        )
    if not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} does not exist (tools/train_tokenizer.py makes one)"
        )
    if cfg.train.init_from and resolve_checkpoint(cfg.train.init_from) is None:
        raise ConfigError(f"train.init_from={cfg.train.init_from} holds no complete checkpoint")


def _load_tokenizer(cfg: RunConfig):
    from megatron_andromeda.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        cfg.data.tokenizer, cfg.data.tokenizer_backend, setting="data.tokenizer_backend"
    )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def _build_data(cfg: RunConfig, data_cfg: DataConfig, tokenizer):
    tc = cfg.train
    num_samples = (tc.steps * tc.global_batch_size, tc.eval_batches * tc.global_batch_size, 0)
    train, valid, _ = build_datasets(
        data_cfg, tokenizer, num_samples, cfg.data.seq_length, cfg.model.vocab_size
    )
    if train is None:
        raise ConfigError(
            "data.train is empty: name at least one dataset prefix (tools/preprocess_data.py writes them)"
        )
    return train, valid


if __name__ == "__main__":
    main()
