"""AdamW with the usual decay exclusions, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_andromeda.config import OptimConfig


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices only: norms (1-D) and, unless asked, embeddings are not decayed.

    A tied embedding doubles as the output head; it follows the embedding rule.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Interleaved pipeline chunks prefix names with the chunk index ("0.embedding.weight").
        base = name.split(".", 1)[1] if name.split(".", 1)[0].isdigit() else name
        is_embedding = base.startswith(("embedding.", "lm_head."))
        if p.dim() < 2 or (is_embedding and not cfg.decay_norms_and_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach=False keeps CPU runs bitwise reproducible across resume (same kernel every step).
    return torch.optim.AdamW(
        parameter_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine / linear decay to cfg.min_lr, then flat at the floor.

    `step` counts optimizer steps from 0; the first step uses lr * 1 / warmup_steps.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
