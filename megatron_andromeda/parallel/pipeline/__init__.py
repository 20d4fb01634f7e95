"""Pipeline parallelism: stages, point-to-point exchange, schedules (GPipe, 1F1B, interleaved), watchdog.

Start with `stages.py` (which layers a rank holds; `build_pipeline_model`), then `schedules.py`
(`build_pipeline_schedule`, the trainer's `ParallelHooks.schedule`). `plans.py` holds the schedules
as plain data and the simulator that proves them free of deadlocks.
"""

from megatron_andromeda.parallel.pipeline.p2p import Message, PipelineComm
from megatron_andromeda.parallel.pipeline.plans import Layout, build_plan, simulate
from megatron_andromeda.parallel.pipeline.schedules import (
    build_pipeline_schedule,
    check_pipeline_config,
    check_schedule,
    gpipe,
    interleaved_1f1b,
    microbatches_per_step,
    one_f_one_b,
    schedule_name,
)
from megatron_andromeda.parallel.pipeline.stages import (
    PipelineStage,
    build_pipeline_model,
    split_layers,
    sync_tied_embedding_weights,
)
from megatron_andromeda.parallel.pipeline.watchdog import Watchdog

__all__ = [
    "Layout",
    "Message",
    "PipelineComm",
    "PipelineStage",
    "Watchdog",
    "build_pipeline_model",
    "build_pipeline_schedule",
    "build_plan",
    "check_pipeline_config",
    "check_schedule",
    "gpipe",
    "interleaved_1f1b",
    "microbatches_per_step",
    "one_f_one_b",
    "schedule_name",
    "simulate",
    "split_layers",
    "sync_tied_embedding_weights",
]
