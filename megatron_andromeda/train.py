"""Entry point: `python -m megatron_andromeda.train --config FILE [section.key=value ...]`.

Reads like a recipe: config -> parallel context -> tokenizer and data -> model -> optimizer ->
trainer. Works unchanged under `torchrun` (one process per device).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_andromeda.config import ConfigError, RunConfig, load_config, save_resolved_config
from megatron_andromeda.models import GPTModel, language_model_loss
from megatron_andromeda.training.checkpoint import read_model_state, resolve_checkpoint
from megatron_andromeda.training.optim import build_optimizer
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
    """Train with a validated config; returns the final loop state."""
    _check_inputs(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = _select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.logging.run_dir)
    save_resolved_config(cfg, run_dir)

    tokenizer = _load_tokenizer(cfg)
    train_data, valid_data = _build_data(cfg, tokenizer)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    trainer = Trainer(
        cfg,
        model,
        optimizer,
        train_data,
        valid_data,
        loss_fn=language_model_loss,
        device=device,
        run_dir=run_dir,
        hooks=ParallelHooks(),
    )
    resume_from = cfg.checkpoint.load_dir or cfg.checkpoint.save_dir
    if not (resume_from and trainer.resume(resume_from)):
        trainer.logger.print(
            f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters"
        )
    state = trainer.fit()
    trainer.logger.close()
    return state


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


def _select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


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

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return tokenizer


def _build_data(cfg: RunConfig, tokenizer):
    from megatron_andromeda.data.builder import build_datasets

    tc = cfg.train
    num_samples = (tc.steps * tc.global_batch_size, tc.eval_batches * tc.global_batch_size, 0)
    train, valid, _ = build_datasets(
        cfg.data, tokenizer, num_samples, cfg.data.seq_length, cfg.model.vocab_size
    )
    if train is None:
        raise ConfigError(
            "data.train is empty: name at least one dataset prefix (tools/preprocess_data.py writes them)"
        )
    return train, valid


if __name__ == "__main__":
    main()
