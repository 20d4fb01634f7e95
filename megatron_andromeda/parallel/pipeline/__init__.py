"""Pipeline parallelism: stages, point-to-point exchange, schedules (GPipe, 1F1B, interleaved), watchdog.

Start with `stages.py` (the stage module; `megatron_andromeda.builder` builds a rank's stages), then
`schedules.py` (`build_pipeline_schedule`, the trainer's `ParallelHooks.schedule`). `plans.py`
holds the schedules as plain data and the simulator that proves them free of deadlocks.
"""

from megatron_andromeda.parallel.pipeline.p2p import Message, PipelineComm
from megatron_andromeda.parallel.pipeline.plans import Layout, build_plan, simulate
from megatron_andromeda.parallel.pipeline.schedules import (
    build_pipeline_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
)
from megatron_andromeda.parallel.pipeline.stages import PipelineStage, sync_tied_embedding_weights
from megatron_andromeda.parallel.watchdog import Watchdog

__all__ = [
    "Layout",
    "Message",
    "PipelineComm",
    "PipelineStage",
    "Watchdog",
    "build_pipeline_schedule",
    "build_plan",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "simulate",
    "sync_tied_embedding_weights",
]
