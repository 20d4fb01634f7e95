"""GPipe, 1F1B and interleaved 1F1B behind the trainer's schedule contract.

    schedule(forward_step, data_iterator, model, num_microbatches) -> [loss parts of each micro-batch]

`forward_step(data_iterator, model) -> (output, loss_fn)` is the trainer's own step, unchanged: the
schedule hands it a stage (its `set_input_tensor` already fed with the received activation) and an
iterator holding exactly that micro-batch. The loss parts come back on the last stage only; other
stages return an empty list (the trainer's `loss_from_last_stage` hook shares the loss).

All three schedules run through one executor over a plan from plans.py; they differ only in the
order of computes (and the interleaved one in how many model chunks a rank holds: `model` is then
an nn.ModuleList of chunks). `build_pipeline_schedule` checks the configuration before the first
step and returns the schedule bound to this rank's communicator.

Once a stage's output activation has been sent, only its autograd node is needed (for the backward
of that micro-batch), not its values: the executor frees the values right after the send
(`release_values`) and later runs the backward from the node's gradient edge. On the first stage
of 1F1B that is p activations of (micro_batch, seq, hidden) fewer held at the peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.hooks import run_layout
from megatron_andromeda.parallel.layout import RunLayout, check_schedule
from megatron_andromeda.parallel.pipeline.p2p import Message, PipelineComm
from megatron_andromeda.parallel.pipeline.plans import Compute, Layout, Transfer, build_plan
from megatron_andromeda.parallel.watchdog import Watchdog

Parts = dict[str, torch.Tensor]
ForwardStep = Callable[[Iterator, nn.Module], tuple[Any, Callable]]


# --------------------------------------------------------------------------------------------- schedules
def gpipe(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    *,
    comm: PipelineComm,
    forward_only: bool = False,
) -> list[Parts]:
    """All forwards, then all backwards (the reference: activations of every micro-batch are alive)."""
    return run_plan("gpipe", forward_step, data_iterator, model, num_microbatches, comm, forward_only)


def one_f_one_b(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    *,
    comm: PipelineComm,
    forward_only: bool = False,
) -> list[Parts]:
    """PipeDream-flush: a short warm-up, then one forward per backward (at most p micro-batches alive)."""
    return run_plan("1f1b", forward_step, data_iterator, model, num_microbatches, comm, forward_only)


def interleaved_1f1b(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: nn.ModuleList,
    num_microbatches: int,
    *,
    comm: PipelineComm,
    forward_only: bool = False,
) -> list[Parts]:
    """1F1B over v model chunks per rank: the bubble shrinks by v for v times the messages."""
    return run_plan("interleaved", forward_step, data_iterator, model, num_microbatches, comm, forward_only)


SCHEDULE_FUNCTIONS = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved_1f1b}


def build_pipeline_schedule(
    ctx: ParallelContext,
    model_cfg: ModelConfig,
    seq_length: int,
    dtype: torch.dtype,
    *,
    watchdog: Watchdog | None = None,
    comm_timeout_s: float = 600.0,
) -> Callable[..., list[Parts]]:
    """This rank's schedule for `ParallelHooks.schedule`, as the run layout names it.

    `dtype` is that of the hidden states between stages (the parameters' dtype). The watchdog
    defaults to one with `comm_timeout_s` on the job's store, stopped by `ctx.close()` (a caller's
    own watchdog is the caller's to close).
    """
    layout = run_layout(ctx)
    if watchdog is None:
        watchdog = Watchdog.for_job(comm_timeout_s)
        ctx.on_close(watchdog.close)
    comm = PipelineComm(
        ctx.pp_group,
        [ctx.layout.rank_of(p, ctx.dp_rank, ctx.tp_rank) for p in range(ctx.pp_size)],
        ctx.pp_rank,
        stage_activation_shape(layout, model_cfg, seq_length),
        dtype,
        ctx.device,
        watchdog,
    )
    return partial(SCHEDULE_FUNCTIONS[layout.schedule], comm=comm)


def stage_activation_shape(
    layout: RunLayout, model_cfg: ModelConfig, seq_length: int
) -> tuple[int, int, int]:
    """(micro_batch, sequence, hidden) of one message; the sequence is this rank's chunk under
    sequence parallelism (see parallel/parallelize.py)."""
    seq = seq_length // (layout.tp if layout.sequence_parallel else 1)
    return (layout.micro_batch_size, seq, model_cfg.hidden_size)


# --------------------------------------------------------------------------------------------- executor
def run_plan(
    schedule: str,
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    comm: PipelineComm,
    forward_only: bool = False,
) -> list[Parts]:
    chunks = list(model) if isinstance(model, nn.ModuleList) else [model]
    if (len(chunks) > 1) != (schedule == "interleaved"):
        raise ValueError(f"schedule {schedule!r} got {len(chunks)} model chunks on this rank")
    layout = Layout(comm.size, len(chunks), num_microbatches)
    if not forward_only:
        check_schedule(comm.size, len(chunks), "gpipe" if schedule == "gpipe" else "1f1b", num_microbatches)
    run = _Execution(
        layout, comm, chunks, forward_step, _MicrobatchData(data_iterator, len(chunks)), forward_only
    )
    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_mode:
        for step in build_plan(schedule, layout, comm.rank, forward_only):
            if isinstance(step, Compute):
                (run.backward if step.backward else run.forward)(step.chunk, step.microbatch)
            else:
                run.exchange(step)
    return run.parts


class _MicrobatchData:
    """Reads micro-batch m once and serves it to each local chunk's forward of m (in that order)."""

    def __init__(self, data_iterator: Iterator, num_chunks: int):
        self.source = data_iterator
        self.num_chunks = num_chunks
        self.cache: dict[int, Any] = {}
        self.read = 0

    def iterator_for(self, chunk: int, microbatch: int) -> Iterator:
        if microbatch not in self.cache:
            if microbatch != self.read:
                raise RuntimeError(
                    f"micro-batch {microbatch} requested before micro-batch {self.read} was read"
                )
            self.cache[microbatch] = next(self.source)
            self.read += 1
        batch = self.cache[microbatch] if chunk < self.num_chunks - 1 else self.cache.pop(microbatch)
        return iter([batch])


class _Execution:
    """The tensors in flight on one rank while a plan runs, keyed by (chunk, micro-batch)."""

    def __init__(
        self,
        layout: Layout,
        comm: PipelineComm,
        chunks: list[nn.Module],
        forward_step: ForwardStep,
        data: _MicrobatchData,
        forward_only: bool,
    ):
        self.layout, self.comm, self.chunks = layout, comm, chunks
        self.forward_step, self.data, self.forward_only = forward_step, data, forward_only
        self.inputs: dict[tuple[int, int], torch.Tensor | None] = {}  # received activations
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # stage outputs, or the loss on the last stage
        self.output_grads: dict[tuple[int, int], torch.Tensor] = {}  # received gradients of the outputs
        self.input_grads: dict[tuple[int, int], torch.Tensor] = {}  # gradients to send back
        self.parts: list[Parts] = []

    def _is_last(self, chunk: int) -> bool:
        return self.layout.stage(self.comm.rank, chunk) == self.layout.stages - 1

    def forward(self, chunk: int, microbatch: int) -> None:
        key = (chunk, microbatch)
        stage = self.chunks[chunk]
        x = self.inputs.get(key)  # None on the first stage
        if hasattr(stage, "set_input_tensor"):
            stage.set_input_tensor(x)
        output, loss_fn = self.forward_step(self.data.iterator_for(chunk, microbatch), stage)
        if self._is_last(chunk):
            loss, parts = loss_fn(output)
            self.parts.append(parts)
            output = loss
        if self.forward_only:
            self.inputs.pop(key, None)
            if self._is_last(chunk):
                return
        self.outputs[key] = output

    def backward(self, chunk: int, microbatch: int) -> None:
        key = (chunk, microbatch)
        output = self.outputs.pop(key)
        grad = self.output_grads.pop(key, None)  # None for the loss
        if grad is not None and output.grad_fn is not None:
            # From the gradient edge: its recorded shape is the output's, whose values may be freed.
            torch.autograd.backward(get_gradient_edge(output), grad_tensors=grad)
        else:
            torch.autograd.backward(output, grad_tensors=grad)
        x = self.inputs.pop(key, None)
        if x is not None:
            self.input_grads[key] = x.grad

    def exchange(self, batch: tuple[Transfer, ...]) -> None:
        messages = [self._message(t) for t in batch]
        received = iter(self.comm.exchange(messages))
        for t in batch:
            if t.send:
                if not t.grad and not self.forward_only:  # the send has completed
                    release_values(self.outputs[(t.chunk, t.microbatch)])
                continue
            key = (t.chunk, t.microbatch)
            if t.grad:
                self.output_grads[key] = next(received)
            else:
                self.inputs[key] = next(received).requires_grad_(not self.forward_only)

    def _message(self, t: Transfer) -> Message:
        what = f"{'gradient' if t.grad else 'activation'} of micro-batch {t.microbatch} (chunk {t.chunk})"
        if not t.send:
            return Message(t.peer, None, what)
        key = (t.chunk, t.microbatch)
        tensor = self.input_grads.pop(key) if t.grad else self.outputs[key]
        if self.forward_only:
            self.outputs.pop(key)
        return Message(t.peer, tensor, what)


def release_values(output: torch.Tensor) -> None:
    """Free the values of a sent stage output, keeping the tensor (and its autograd node) alive.

    Correct whatever the stage's last operation: an operation that saved its output for the
    backward holds its own reference to the storage (the values then stay until that backward).
    Ours end in the residual add or the sequence-parallel gather, which save nothing, so the memory
    is really returned. Views and leaves are left alone: a view's storage belongs to its base, and
    a leaf has no node to run the backward from.
    """
    if output._base is None and output.grad_fn is not None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)
