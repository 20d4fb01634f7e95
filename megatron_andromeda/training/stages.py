"""Multi-stage runs: each stage is an ordinary run derived from the run config.

Stage i trains on its own data recipe for its own token budget, with its checkpoints in
`checkpoint.save_dir/<i>-<name>` and its logs in `logging.run_dir/<i>-<name>`. It starts from the
previous stage's final weights (a fresh optimizer), unless it already has checkpoints of its own,
in which case it resumes inside the stage: re-running the same command continues where a killed
run stopped, skipping finished stages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_andromeda.config import RunConfig, StageConfig
from megatron_andromeda.data.recipe import load_recipe, stage_token_budget


@dataclass
class StagePlan:
    index: int
    stage: StageConfig
    config: RunConfig  # the derived single-stage run config
    lr_step_offset: int  # optimizer steps of the schedule already spent by earlier stages
    lr_total_steps: int  # length of the schedule this stage's steps are measured against

    @property
    def label(self) -> str:
        return f"{self.index}-{self.stage.name}"


def stage_steps(cfg: RunConfig, stage: StageConfig, index: int) -> int:
    """The stage's steps, or its token budget (the stage's, else its recipe's) in whole global batches."""
    if stage.steps is not None:
        return stage.steps
    recipe = load_recipe(stage.recipe) if stage.recipe and stage.tokens is None else None
    budget = stage_token_budget(stage.tokens, recipe, f"stages[{index}] ({stage.name})")
    return math.ceil(budget / (cfg.train.global_batch_size * cfg.data.seq_length))


def plan_stages(cfg: RunConfig) -> list[StagePlan]:
    """One derived RunConfig per stage, validated; the learning-rate bookkeeping across stages."""
    steps = [stage_steps(cfg, stage, i) for i, stage in enumerate(cfg.stages)]
    plans, done = [], 0
    for i, (stage, n) in enumerate(zip(cfg.stages, steps)):
        label = f"{i}-{stage.name}"
        data = dataclasses.replace(
            cfg.data,
            recipe=stage.recipe,
            train=list(stage.train),
            valid=list(stage.valid) if stage.valid or stage.recipe else list(cfg.data.valid),
            reset_attention_mask=_pick(stage.reset_attention_mask, cfg.data.reset_attention_mask),
            reset_position_ids=_pick(stage.reset_position_ids, cfg.data.reset_position_ids),
        )
        optim = dataclasses.replace(
            cfg.optim,
            lr=_pick(stage.lr, cfg.optim.lr),
            min_lr=_pick(stage.min_lr, cfg.optim.min_lr),
            warmup_steps=_pick(stage.warmup_steps, cfg.optim.warmup_steps),
        )
        continuing = stage.lr_schedule == "continue"
        if continuing and i > 0:
            optim = dataclasses.replace(
                optim, warmup_steps=0 if stage.warmup_steps is None else optim.warmup_steps
            )
        previous = Path(cfg.checkpoint.save_dir) / plans[-1].label if plans else None
        init_from = _init_source(stage, previous)
        config = dataclasses.replace(
            cfg,
            data=data,
            optim=optim,
            train=dataclasses.replace(cfg.train, steps=n, init_from=init_from),
            checkpoint=dataclasses.replace(
                cfg.checkpoint, save_dir=str(Path(cfg.checkpoint.save_dir) / label), load_dir=""
            ),
            logging=dataclasses.replace(cfg.logging, run_dir=str(Path(cfg.logging.run_dir) / label)),
            stages=[],
        )
        if continuing:
            plans.append(StagePlan(i, stage, config, done, sum(steps)))
        else:
            plans.append(StagePlan(i, stage, config, 0, n))
        done += n
    return plans


def _init_source(stage: StageConfig, previous: Path | None) -> str:
    if stage.init_from == "none" or (stage.init_from == "previous" and previous is None):
        return ""
    if stage.init_from == "previous":
        return str(previous)
    return stage.init_from


def _pick(value, default):
    return default if value is None else value
