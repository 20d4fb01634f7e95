"""Entry point: `python -m megatron_andromeda.train --config FILE [section.key=value ...]`.

Reads like a recipe: config -> parallel context -> tokenizer and data -> model -> optimizer ->
trainer. Works unchanged under `torchrun` (one process per device).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatron_andromeda.builder import build_loss_fn, build_model, stage_module
from megatron_andromeda.checkpoint import Placement, load_model_weights, resolve_checkpoint
from megatron_andromeda.checkpoint.state import global_name, global_shapes
from megatron_andromeda.config import (
    ModelConfig,
    RunConfig,
    describe_config,
    load_config,
    save_resolved_config,
)
from megatron_andromeda.data.blend import Blend, resolve_blends
from megatron_andromeda.data.builder import build_datasets, check_training_data
from megatron_andromeda.errors import TRACEBACK_ENV, ConfigError, report_user_errors
from megatron_andromeda.kernels import BackendChoice, fp8_context, select_backends
from megatron_andromeda.parallel import ParallelContext, init_parallel, plan_layout
from megatron_andromeda.parallel.context import world_size_from_env
from megatron_andromeda.parallel.data_parallel import DEFAULT_BUCKET_NUMEL
from megatron_andromeda.parallel.fully_sharded import local_shard
from megatron_andromeda.parallel.hooks import ParallelHooks, build_parallel_training, run_layout
from megatron_andromeda.parallel.layout import RunLayout
from megatron_andromeda.parallel.mixed_precision import precision_dtype
from megatron_andromeda.parallel.pipeline import build_pipeline_schedule, sync_tied_embedding_weights
from megatron_andromeda.parallel.watchdog import Watchdog
from megatron_andromeda.training.optim import parameter_groups
from megatron_andromeda.training.stages import plan_stages
from megatron_andromeda.training.trainer import Trainer, TrainState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_andromeda.train",
        description="Train an Andromeda (PaLM / MPT-style) decoder.",
        epilog="Overrides use dotted keys, e.g. model=andromeda-100m model.num_layers=4 train.steps=100. "
        "`--help SECTION` lists one section's keys. Expected errors print one line; "
        f"{TRACEBACK_ENV}=1 shows their traceback.",
        add_help=False,
    )
    parser.add_argument("--config", type=str, default=None, help="YAML run config (see examples/configs/)")
    parser.add_argument(
        "-h", "--help", nargs="?", const="all", metavar="SECTION",
        help="show this help and every config key (type, default, meaning), or one SECTION's keys",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the file")
    args = parser.parse_args(argv)
    if args.help is not None:
        if args.help == "all":
            parser.print_help()
            print("\nconfig keys (YAML sections, or section.key=value on the command line):")
        with report_user_errors():
            print(describe_config(None if args.help == "all" else args.help))
        sys.exit(0)
    return args


def main(argv: list[str] | None = None) -> TrainState:
    args = parse_args(argv)
    with report_user_errors():
        cfg = load_config(args.config, args.overrides)
        return run(cfg)


def run(cfg: RunConfig) -> TrainState:
    """Train with a validated config (every stage in order, for a multi-stage run)."""
    layout = plan_layout(cfg, world_size_from_env())  # every layout rule, before any process group
    plans = plan_stages(cfg) if cfg.stages else []
    stage_configs = [p.config for p in plans] or [cfg]
    blends = [resolve_blends(c.data) for c in stage_configs]  # each stage's data, resolved once
    check_training_data(stage_configs, [p.label for p in plans], blends)  # the files, once
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in cfg.warnings():
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    ctx = init_parallel(cfg, layout)
    try:
        if not plans:
            return run_stage(cfg, ctx, blends=blends[0])
        state = TrainState()
        for plan, stage_blends in zip(plans, blends):
            if ctx.rank == 0:
                print(f"=== stage {plan.label}: {plan.config.train.steps} steps", flush=True)
            state = run_stage(
                plan.config, ctx, plan.stage.freeze, plan.lr_step_offset, plan.lr_total_steps, stage_blends
            )
        return state
    except BaseException:
        ctx.close(clean=False)  # no barrier: peers stuck elsewhere would never reach it
        raise
    finally:
        ctx.close()  # threads stopped, a barrier, the process groups destroyed once (a no-op if done)


def run_stage(
    cfg: RunConfig,
    ctx: ParallelContext,
    freeze: Sequence[str] = (),
    lr_step_offset: int = 0,
    lr_total_steps: int | None = None,
    blends: dict[str, Blend] | None = None,
) -> TrainState:
    """One training run: resumes from its own checkpoints when they exist.

    `blends` are the run's resolved blends (default: resolved here from `cfg.data`).
    """
    _check_inputs(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.logging.run_dir)
    if ctx.rank == 0:
        save_resolved_config(cfg, run_dir)

    tokenizer = _load_tokenizer(cfg)
    blends = blends if blends is not None else resolve_blends(cfg.data)
    train_data, valid_data = _build_data(cfg, blends, tokenizer)
    parts = build_training(cfg, ctx, tokenizer.vocab_size, freeze)
    trainer = Trainer(
        cfg, parts.model, parts.optimizer, train_data, valid_data,
        loss_fn=parts.loss_fn, device=ctx.device, run_dir=run_dir, hooks=parts.hooks,
        lr_step_offset=lr_step_offset, lr_total_steps=lr_total_steps,
        step_context=parts.step_context,
    )  # fmt: skip
    try:
        trainer.logger.print(f"kernels: {parts.kernels.describe()}")
        resume_from = cfg.checkpoint.load_dir or cfg.checkpoint.save_dir
        if not (resume_from and trainer.resume(resume_from)):
            total = sum(local_shard(p)[0].numel() for p in parts.model.parameters())  # (FSDP2: its shard)
            trainer.logger.print(f"model {cfg.model.name}: {total:,} parameters on this rank"
                                 + (f", {parts.frozen:,} frozen" if parts.frozen else ""))  # fmt: skip
        state = trainer.fit()
        if ctx.rank == 0:
            write_data_report(
                run_dir, blends["train"], train_data, state.consumed_samples, cfg.data.seq_length
            )
    finally:
        trainer.close()  # the background save (bounded wait) and the metric sinks, also on an error
    return state


@dataclass
class TrainingParts:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: ParallelHooks
    loss_fn: Callable
    kernels: BackendChoice
    frozen: int
    step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # FP8 autocast


def build_training(
    cfg: RunConfig,
    ctx: ParallelContext,
    real_vocab_size: int,
    freeze: Sequence[str] = (),
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
) -> TrainingParts:
    """This rank's model (builder.build_model), optimizer, loss, loop hooks and step context (FP8
    autocast, its amaxes reduced over this pipeline stage's ranks); one path for any layout.

    One process runs the same recipe as many: half-precision parameters with fp32 master weights
    and fp32 gradient buckets, the replicated or ZeRO-1 optimizer, the hooks' reductions (no-ops).
    """
    kernels = select_backends(cfg.backend, ctx.device, precision=cfg.train.precision)
    model = build_model(cfg, ctx, kernels)
    if cfg.train.init_from:  # any saved layout: each rank reads the slices it holds
        load_model_weights(cfg.train.init_from, model, Placement.from_context(ctx))
        sync_tied_embedding_weights(model, ctx)
    frozen = freeze_parameters(model, freeze, cfg, run_layout(ctx))
    loss_fn = build_loss_fn(ctx, kernels, real_vocab_size)  # padding ids masked out
    watchdog = None
    if ctx.distributed:  # one per process: the pipeline's messages and the step's collectives
        watchdog = Watchdog.for_job(cfg.parallel.comm_timeout_s)
        ctx.on_close(watchdog.close)
    schedule = None
    if ctx.pp_size > 1:
        dtype = precision_dtype(cfg.train.precision)
        schedule = build_pipeline_schedule(ctx, cfg.model, cfg.data.seq_length, dtype, watchdog=watchdog)
    groups = parameter_groups(model, cfg.optim)
    parallel = build_parallel_training(
        ctx, model, cfg, groups, schedule=schedule, bucket_numel=bucket_numel, watchdog=watchdog
    )
    step_context = partial(fp8_context, kernels, ctx.stage_group)  # amaxes reduced within the stage
    return TrainingParts(model, parallel.optimizer, parallel.hooks, loss_fn, kernels, frozen, step_context)


def freeze_parameters(
    model: torch.nn.Module, patterns: Sequence[str], cfg: RunConfig, layout: RunLayout
) -> int:
    """Stop training the parameters whose names match any fnmatch pattern; returns how many elements.

    Names are the model's own (`global_name`: no chunk prefix, the last stage's tied output head is
    `embedding.weight`), so a pattern means the same on every layout; the patterns are checked on
    the whole model and layout (`check_freeze`), identically on every rank, before any is applied.
    """
    check_freeze(patterns, cfg.model, layout)
    frozen = 0
    for local, p in model.named_parameters():
        if _frozen(global_name(local, cfg.model), patterns):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def check_freeze(patterns: Sequence[str], cfg: ModelConfig, layout: RunLayout) -> None:
    """Every pattern names some parameter of the model, and every pipeline rank keeps one to train.

    A pipeline rank may hold none of a pattern's parameters (that is no error); one left with
    nothing to train could not take part in the step, so the split is refused for that stage.
    """
    if not patterns:
        return
    every_name = list(global_shapes(cfg))
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(name, p) for name in every_name)]
    if unmatched:
        raise ConfigError(
            f"freeze patterns {unmatched} match no parameter of the model (its names look like "
            f"{', '.join(repr(n) for n in every_name[:2])}, ..., {every_name[-1]!r})"
        )
    for pp_rank in range(layout.pp):
        names = every_name if layout.pp == 1 else _stage_parameter_names(cfg, layout, pp_rank)
        if all(_frozen(name, patterns) for name in names):
            which = "the whole model" if layout.pp == 1 else f"every parameter of pipeline rank {pp_rank}"
            raise ConfigError(
                f"freeze patterns {list(patterns)} freeze {which} ({', '.join(names[:3])}, ...), which "
                "would have nothing to train: freeze less"
                + ("" if layout.pp == 1 else ", or split the layers otherwise (parallel.layers_per_stage)")
            )


def _frozen(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _stage_parameter_names(cfg: ModelConfig, layout: RunLayout, pp_rank: int) -> list[str]:
    """The model's names of the parameters pipeline rank `pp_rank` holds (built on the meta device)."""
    names = []
    with torch.device("meta"):
        for stage, span in layout.spans_of(pp_rank):
            chunk = stage_module(cfg, stage, span, len(layout.stage_spans))
            names += [global_name(local, cfg) for local, _ in chunk.named_parameters()]
    return names


def write_data_report(run_dir: Path, blend: Blend, train_data, consumed: int, seq_length: int) -> Path:
    """What this run trained on: samples and tokens per source, from the blend's own index."""
    counts = train_data.source_counts(consumed) if hasattr(train_data, "source_counts") else [consumed]
    sources = [
        {"source": s.name, "dataset": s.prefix, "weight": s.weight, "samples": int(n),
         "tokens": int(n) * seq_length}
        for s, n in zip(blend.sources, counts)
    ]  # fmt: skip
    path = run_dir / "data_report.json"
    path.write_text(json.dumps({"consumed_samples": consumed, "sources": sources}, indent=2))
    return path


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
    load_dir, save_dir = cfg.checkpoint.load_dir, cfg.checkpoint.save_dir
    # An explicit load_dir is a request to resume; only save_dir (also when load_dir names it: a job
    # script's first launch) may be empty, meaning start from step 0.
    explicit = load_dir and not (save_dir and Path(load_dir).resolve() == Path(save_dir).resolve())
    if explicit and resolve_checkpoint(load_dir) is None:
        raise ConfigError(
            f"checkpoint.load_dir={load_dir} holds no complete checkpoint, so there is nothing to resume: "
            "point it at a save directory (or one step_* inside it), leave it empty to resume from "
            "checkpoint.save_dir when that holds one, or use train.init_from for weights only"
        )


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


def _build_data(cfg: RunConfig, blends: dict[str, Blend], tokenizer):
    tc = cfg.train
    num_samples = (tc.steps * tc.global_batch_size, tc.eval_batches * tc.global_batch_size, 0)
    train, valid, _ = build_datasets(
        cfg.data, tokenizer, num_samples, cfg.data.seq_length, cfg.model.vocab_size, blends=blends
    )
    if train is None:
        raise ConfigError(
            "data.train is empty: name at least one dataset prefix (tools/preprocess_data.py writes them)"
        )
    return train, valid


if __name__ == "__main__":
    main()
