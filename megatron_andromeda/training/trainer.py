"""The training loop: micro-batches -> gradient accumulation -> clip -> safe step -> log / eval / save.

The loop knows nothing about how the model is split. Everything parallel comes in through the
`ParallelHooks` it is given: which samples this rank reads, how gradients are finished (tensor and
data-parallel reductions), how the global gradient norm and loss averages are computed. A single
process uses the defaults.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megatron_andromeda import checkpoint as ckpt
from megatron_andromeda.config import RunConfig
from megatron_andromeda.models.accounting import training_flops_per_token
from megatron_andromeda.parallel.hooks import ParallelHooks
from megatron_andromeda.parallel.layout import RunLayout
from megatron_andromeda.training.metrics import MetricsLogger, peak_flops_for
from megatron_andromeda.training.optim import learning_rate, set_learning_rate

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


def source_names(dataset: Any) -> list[str]:
    """The blend's source labels (data.blended_dataset.BlendedDataset); one unnamed source otherwise."""
    return list(getattr(dataset, "source_names", [""]))


def per_source_totals(
    parts: dict[str, torch.Tensor], source_id: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """(2, num_sources): summed loss and loss tokens of the micro-batch per blend source."""
    totals = torch.zeros(2, num_sources, device=source_id.device)
    totals[0].index_add_(0, source_id, parts["sample_loss_sum"].float())
    totals[1].index_add_(0, source_id, parts["sample_tokens"].float())
    return totals


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_data: Any,
        valid_data: Any | None,
        *,
        loss_fn: LossFn,
        device: torch.device,
        run_dir: Path,
        hooks: ParallelHooks | None = None,
        logger: MetricsLogger | None = None,
        lr_step_offset: int = 0,
        lr_total_steps: int | None = None,
        step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.train_data = train_data
        self.valid_data = valid_data
        self.loss_fn = loss_fn
        self.device = device
        self.run_dir = run_dir
        self.hooks = hooks or ParallelHooks()
        self.state = TrainState()
        self.step_context = step_context  # e.g. FP8 autocast around the forward pass
        # A stage that continues an earlier stage's schedule reads it at (offset + step) of total.
        self.lr_step_offset = lr_step_offset
        self.lr_total_steps = lr_total_steps or cfg.train.steps
        tc = cfg.train
        # The run's layout owns the batch arithmetic; one process without hooks derives its own.
        layout = self.hooks.layout or RunLayout.single(
            cfg.model.num_layers, tc.micro_batch_size, tc.global_batch_size
        )
        self.layout = layout
        self.samples_per_rank = layout.samples_per_rank
        self.accumulation_steps = layout.num_microbatches
        self.tokens_per_step = tc.global_batch_size * cfg.data.seq_length
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_length)
        self.logger = logger or MetricsLogger(cfg.logging, run_dir, tc.steps, self.hooks.is_logging_rank)
        fp16 = tc.precision == "fp16"
        self.scaler = (self.hooks.loss_scaler or torch.amp.GradScaler(device.type)) if fp16 else None
        # What the optimizer updates: the model's parameters, or fp32 master copies in parallel runs.
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.num_sources = len(source_names(train_data))
        self.placement = ckpt.Placement.of_run(layout, self.hooks.rank)
        self.checkpointer = ckpt.Checkpointer(cfg, self.placement, rng_tracker=self.hooks.rng)

    # ------------------------------------------------------------------------------------------ data
    def micro_batches(self, step_start_sample: int, dataset: Any | None = None):
        """This rank's micro-batches of the global batch starting at `step_start_sample`.

        Rank r reads the contiguous slice [r * per_rank, (r + 1) * per_rank) of the global batch, so
        the ranks' samples are disjoint, their union is the global batch, and a resume at any
        consumed-sample count reads the same samples.
        """
        mbs = self.cfg.train.micro_batch_size
        first = step_start_sample + self.hooks.dp_rank * self.samples_per_rank
        for m in range(self.accumulation_steps):
            source = self.train_data if dataset is None else dataset
            yield self._collate(source, range(first + m * mbs, first + (m + 1) * mbs))

    def _collate(self, dataset: Any, indices: range) -> dict[str, torch.Tensor]:
        positions = [i % len(dataset) for i in indices]
        samples = [dataset[i] for i in positions]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        if dataset is self.train_data and self.num_sources > 1:  # each sample's source: per-source loss
            batch["source_id"] = torch.from_numpy(dataset.dataset_index[positions].astype(np.int64))
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------ steps
    def forward_step(self, data_iterator, model: nn.Module):
        """The schedule contract: `forward_step(data_iterator, model) -> (output, loss_fn)`.

        `output` is what the model (or pipeline stage) returns; `loss_fn(output)` gives the loss to
        backpropagate, already divided by the number of micro-batches (and scaled for fp16), and the
        unscaled parts for logging. On a stage without the head the schedule never calls loss_fn.
        """
        batch = next(data_iterator)
        position_ids = batch.get("position_ids") if self.cfg.data.reset_position_ids else None
        with self._autocast(), self.step_context():
            output = model(batch["tokens"], position_ids=position_ids, segment_ids=batch.get("segment_ids"))

        def loss_fn(logits: torch.Tensor):
            loss, parts = self.loss_fn(
                logits, batch["labels"], batch.get("loss_mask"), z_loss=self.cfg.model.z_loss
            )
            if "source_id" in batch and "sample_loss_sum" in parts:
                parts["per_source"] = per_source_totals(parts, batch["source_id"], self.num_sources)
            scaled = loss / self.accumulation_steps
            return (self.scaler.scale(scaled) if self.scaler else scaled), parts

        return output, loss_fn

    def train_step(self) -> dict[str, float]:
        tc, oc = self.cfg.train, self.cfg.optim
        self.hooks.begin_step(self.state.step + 1)  # numbered like its metrics line
        lr = learning_rate(self.lr_step_offset + self.state.step, oc, self.lr_total_steps)
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.hooks.schedule(
            self.forward_step,
            iter(self.micro_batches(self.state.consumed_samples)),
            self.model,
            self.accumulation_steps,
        )
        self.hooks.finish_gradients(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        local = (
            torch.stack([p["lm_loss"] for p in parts]).mean()
            if parts
            else torch.zeros((), device=self.device)
        )
        loss = self.hooks.mean_across_data(self.hooks.loss_from_last_stage(local))
        source_losses = self._source_losses(parts)
        finite = math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
        skip = self.hooks.any_rank_true(not finite)
        if skip:
            self._skip_step()
        else:
            self._clip(grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.state.consecutive_skips = 0
        if self.scaler is not None:
            self.scaler.update()
        self.state.step += 1
        self.state.consumed_samples += tc.global_batch_size
        metrics = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(), "skipped": float(skip)}
        return {**metrics, **source_losses}

    def _source_losses(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """`loss/<source>` of each blend source in this step's global batch (absent: no tokens)."""
        if self.num_sources < 2:
            return {}
        totals = torch.zeros(2, self.num_sources, device=self.device)
        for p in parts:
            totals += p.get("per_source", 0)
        # The ratio is unchanged by the mean across data ranks: both rows are divided alike.
        totals = self.hooks.mean_across_data(self.hooks.loss_from_last_stage(totals))
        loss_sum, tokens = totals.tolist()
        names = source_names(self.train_data)
        return {f"loss/{names[k]}": loss_sum[k] / n for k, n in enumerate(tokens) if n > 0}

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.hooks.grad_norm is not None:
            return self.hooks.grad_norm(grads)
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def _clip(self, grad_norm: torch.Tensor) -> None:
        clip = self.cfg.optim.clip_grad
        if clip > 0:
            coef = torch.clamp(clip / (grad_norm + 1e-6), max=1.0)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def _skip_step(self) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        self.logger.print(  # numbered like the metrics line of this step (after the increment)
            f"step {self.state.step + 1}: non-finite loss or gradient, update skipped on every rank"
        )
        limit = self.cfg.train.max_consecutive_skips
        if self.state.consecutive_skips >= limit:
            raise RuntimeError(
                f"{self.state.consecutive_skips} consecutive steps had non-finite loss or gradients "
                f"(train.max_consecutive_skips={limit}); lower optim.lr, check the data, or use bf16/fp32"
            )

    def _autocast(self):
        precision = self.cfg.train.precision
        if precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, dataset: Any | None = None) -> dict[str, float]:
        """Mean loss and perplexity over the first train.eval_batches global batches of `dataset`.

        Each data-parallel rank reads its slice of each global batch, as in training, so the figure
        does not depend on the layout.
        """
        dataset = dataset if dataset is not None else self.valid_data
        if dataset is None:
            return {}
        self.model.eval()
        gbs, steps = self.cfg.train.global_batch_size, self.cfg.train.eval_batches
        n = steps * self.accumulation_steps
        batches = (batch for step in range(steps) for batch in self.micro_batches(step * gbs, dataset))
        parts = self.hooks.schedule(self.forward_step, batches, self.model, n, forward_only=True)
        local = (
            torch.stack([p["lm_loss"] for p in parts]).mean()
            if parts
            else torch.zeros((), device=self.device)
        )
        loss = self.hooks.mean_across_data(self.hooks.loss_from_last_stage(local)).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> TrainState:
        """Train to train.steps, or stop early after step `stop_at` (as a time-limited job would)."""
        tc, lc = self.cfg.train, self.cfg.logging
        last = tc.steps if stop_at is None else min(stop_at, tc.steps)
        self.logger.start_at(self.state.step)
        window_start, window_steps = time.perf_counter(), 0
        run_start, start_step = time.perf_counter(), self.state.step
        if self.state.step == 0 and tc.eval_interval:
            self.logger.log(0, self.evaluate(), kind="valid")
        while self.state.step < last:
            metrics = self.train_step()
            window_steps += 1
            self.logger.advance()
            step = self.state.step
            if step % lc.log_interval == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                self.logger.log(
                    step, self._speed_metrics(metrics, elapsed, window_steps, run_start, start_step)
                )
                window_start, window_steps = time.perf_counter(), 0
            if tc.eval_interval and (step % tc.eval_interval == 0 or step == tc.steps):
                self.logger.log(step, self.evaluate(), kind="valid")
            exiting = tc.exit_interval > 0 and step % tc.exit_interval == 0 and step < tc.steps
            if self._should_save(step) or (exiting and self.cfg.checkpoint.save_dir):
                self.save()
            if exiting:
                self.logger.print(f"train.exit_interval={tc.exit_interval}: exiting at step {step}")
                break
        self.checkpointer.wait()  # a background save must be committed before the process may exit
        return self.state

    def _speed_metrics(self, m: dict, elapsed: float, steps: int, run_start: float, start_step: int) -> dict:
        tokens_per_s = self.tokens_per_step * steps / max(elapsed, 1e-9)
        flops_per_s = tokens_per_s * self.flops_per_token / self.hooks.num_devices
        peak = self.cfg.logging.peak_flops
        if peak is None and self.device.type == "cuda":
            peak = peak_flops_for(torch.cuda.get_device_name(self.device))
        done = self.state.step - start_step
        eta = (
            (time.perf_counter() - run_start) / done * (self.cfg.train.steps - self.state.step)
            if done
            else None
        )
        return {
            "tokens": self.state.step * self.tokens_per_step,
            "loss": m["loss"],
            **{key: value for key, value in m.items() if key.startswith("loss/")},  # per blend source
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.hooks.num_devices,
            "tflops_per_device": flops_per_s / 1e12,
            "mfu": flops_per_s / peak if peak else None,
            "peak_memory_gb": _peak_memory_gb(self.device),
            "skipped_steps": self.state.skipped_steps,
            "eta_s": eta,
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    def _should_save(self, step: int) -> bool:
        cc = self.cfg.checkpoint
        if not cc.save_dir:
            return False
        return step == self.cfg.train.steps or (cc.save_interval > 0 and step % cc.save_interval == 0)

    def close(self) -> None:
        """Release what the loop started, on success or error: the background save (waited for,
        bounded) and the metric sinks (TensorBoard's writer thread)."""
        self.checkpointer.close()
        self.logger.close()

    def save(self) -> Path:
        """Save this step (in the background with checkpoint.async_save; the run's last save blocks)."""
        tc, step = self.cfg.train, self.state.step
        last = step >= tc.steps or (tc.exit_interval > 0 and step % tc.exit_interval == 0)
        path = self.checkpointer.save(step, self.model, self.optimizer, self.trainer_state(), blocking=last)
        self.logger.print(f"saved checkpoint {path}" if not self.checkpointer.in_flight
                          else f"saving checkpoint {path} in the background")  # fmt: skip
        return path

    def trainer_state(self) -> dict[str, Any]:
        """The loop's JSON state; the data position is consumed_samples (micro_batches reads from it)."""
        state: dict[str, Any] = asdict(self.state)
        state["scheduler"] = {
            "lr_step_offset": self.lr_step_offset,
            "lr_total_steps": self.lr_total_steps,
            "next_lr": learning_rate(
                self.lr_step_offset + self.state.step, self.cfg.optim, self.lr_total_steps
            ),
        }
        if self.scaler is not None:
            state["grad_scaler"] = {
                k: v for k, v in self.scaler.state_dict().items() if not torch.is_tensor(v)
            }
        return state

    def resume(self, path: str | Path) -> bool:
        """Restore model, optimizer, RNG and loop state from the newest complete checkpoint under path.

        The checkpoint may come from any tensor x pipeline x data layout; RNG states are restored
        when the layout is the same.
        """
        if ckpt.resolve_checkpoint(path) is None:
            return False
        state = ckpt.load_checkpoint(
            path, self.model, self.optimizer, placement=self.placement,
            rng_tracker=self.hooks.rng, tokenizer=self.cfg.data.tokenizer,
        )  # fmt: skip
        for key in asdict(self.state):
            setattr(self.state, key, state.get(key, getattr(self.state, key)))
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.logger.print(f"resumed from {state['path']} at step {self.state.step}")
        return True


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
