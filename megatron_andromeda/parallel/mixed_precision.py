"""Mixed precision: half-precision parameters, fp32 master weights, fp16 dynamic loss scaling.

bf16 and fp16 runs keep the model's parameters, and so its activations, in half precision. The
gradients accumulate in fp32 `main_grad` buffers (data_parallel.GradBuffer) and AdamW updates fp32
master copies, which are rounded into the model after every step. An update lr * m / sqrt(v) is
often below half the spacing of bf16 numbers near the weight and would simply vanish if applied to
the bf16 weight. In fp32 runs the "master" is a view of the parameter itself: nothing is copied.

`MixedPrecisionOptimizer` is the plain, replicated optimizer: every data-parallel rank holds every
master weight and Adam moment. `DistributedOptimizer` (distributed_optimizer.py) subclasses it to
hold one shard. Both update 1-D *fragments* (elements [start, stop) of a flattened parameter) with a
torch AdamW built from the parameter groups the caller gives (`training.optim.parameter_groups`, the
same groups as the plain torch optimizer), so `set_learning_rate` and per-group weight decay work
unchanged.

state_dict() layout (what checkpoint/state.py stores, pickle-free):

    {"state": {i: {"step": tensor(), "exp_avg": (n,), "exp_avg_sq": (n,),  # fp32, 1-D
                   "master_param": (n,),     # only for bf16/fp16 parameters (fp32 ones are the weights)
                   "shard_start": a, "shard_stop": b,     # elements [a, b) of flattened parameter i
                   "numel": n}},                           # of its n elements
     "param_groups": [{"lr", "betas", "eps", "weight_decay", ..., "params": [i, ...], "param_names": [...]}]}

`i` is the parameter's position in the order of the parameter groups (the indices torch's AdamW
uses). "params" / "param_names" list every parameter of a group on every rank; "state" has only the
fragments this rank holds. To reshard, concatenate the fragments of parameter i over the data ranks
in shard_start order (`distributed_optimizer.merge_optimizer_states`): an entry without shard
keys is a whole parameter, and `load_state_dict` slices whatever fragment this rank needs from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_andromeda.config import OptimConfig
from megatron_andromeda.parallel.context import ParallelContext
from megatron_andromeda.parallel.data_parallel import GradBuffer
from megatron_andromeda.parallel.grad_norm import counted_ranges, global_grad_norm, pipeline_copies
from megatron_andromeda.parallel.mappings import Group, all_reduce_

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHARD_KEYS = ("shard_start", "shard_stop")


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters (not the buffers: rotary tables, ALiBi slopes stay fp32) to `dtype`."""
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def world_group(ctx: ParallelContext) -> Group:
    """Every rank of the run, explicitly (None, a no-op group, in a single process)."""
    return dist.group.WORLD if ctx.distributed else None


@dataclass(eq=False)
class Fragment:
    """Elements [start, stop) of flattened model parameter `param`, as this rank's optimizer sees them."""

    name: str
    index: int  # the parameter's position in the optimizer's order: its checkpoint key
    param: nn.Parameter
    start: int
    stop: int
    master: torch.Tensor  # (stop - start,) fp32; .grad is the matching slice of the main-gradient buffer
    counted: list[tuple[int, int]] = field(default_factory=list)  # what the global norm counts here

    @property
    def is_view(self) -> bool:
        """fp32 parameters are their own master weights."""
        return self.param.dtype == torch.float32


class MixedPrecisionOptimizer:
    """AdamW on fp32 master fragments, reading the fp32 main gradients; replicated over data ranks."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        cfg: OptimConfig,
        grad_buffer: GradBuffer,
        ctx: ParallelContext,
    ):
        """`param_groups`: torch-style groups of `model`'s trainable parameters with their own settings."""
        self.grad_buffer = grad_buffer
        self.ctx = ctx
        self.device = grad_buffer.data.device
        self._build(model, param_groups, cfg)

    def _build(self, model: nn.Module, param_groups: list[dict[str, Any]], cfg: OptimConfig) -> None:
        """This rank's fragment of each parameter (`_fragment`) and the AdamW over their masters."""
        names = {p: n for n, p in model.named_parameters()}
        copies = pipeline_copies(model, self.ctx)
        self.fragments: list[Fragment] = []
        self._group_params: list[list[tuple[int, str]]] = []
        groups, index = [], 0
        for group in param_groups:
            masters, members = [], []
            for param in group["params"]:
                members.append((index, names[param]))
                fragment = self._fragment(names[param], index, param, param in copies)
                if fragment is not None:
                    self.fragments.append(fragment)
                    masters.append(fragment.master)
                index += 1
            self._group_params.append(members)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": masters})
        self.inner = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=self.device.type == "cuda"
        )

    # ------------------------------------------------------------------------------------------ layout
    def shard_range(self, param: nn.Parameter) -> tuple[int, int]:
        """The elements of flattened `param` this rank updates: all of them here."""
        return 0, param.numel()

    @property
    def norm_group(self) -> Group:
        """Data ranks hold identical reduced gradients: sum the squares over the model-parallel group only."""
        return self.ctx.mp_group

    def _fragment(self, name: str, index: int, param: nn.Parameter, is_copy: bool) -> Fragment | None:
        start, stop = self.shard_range(param)
        if start >= stop:
            return None
        flat = param.detach().view(-1)
        master = flat[start:stop] if param.dtype == torch.float32 else flat[start:stop].float()
        offset = self.grad_buffer.layout.ranges[param][0]
        master.grad = self.grad_buffer.data[offset + start : offset + stop]
        counted = counted_ranges(param, start, stop, self.ctx.tp_rank, is_copy)
        return Fragment(name, index, param, start, stop, master, counted)

    # ------------------------------------------------------------------------------------------ optimizer API
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the main gradients (the buffer is reused, so set_to_none has nothing to free)."""
        self.grad_buffer.zero_()

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the reduced gradients, every value counted once (grad_norm.py)."""
        return global_grad_norm(
            ((f.master.grad, f.counted) for f in self.fragments), self.norm_group, self.device
        )

    @torch.no_grad()
    def step(self) -> None:
        """Update the masters, round them into the model's parameters (then, sharded, all-gather)."""
        self.inner.step()
        for f in self.fragments:
            if not f.is_view:
                f.param.detach().view(-1)[f.start : f.stop].copy_(f.master)
        self._after_step()

    def _after_step(self) -> None:
        pass

    @torch.no_grad()
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for master weights (copies only) and Adam moments."""
        out = {
            "master": sum(f.master.nbytes for f in self.fragments if not f.is_view),
            "exp_avg": 0,
            "exp_avg_sq": 0,
        }
        for state in self.inner.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                out[key] += state[key].nbytes if key in state else 0
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's fragments keyed by parameter index (layout in the module docstring)."""
        state = {}
        for f in self.fragments:
            entry = {k: v for k, v in self.inner.state.get(f.master, {}).items()}
            if not f.is_view:
                entry["master_param"] = f.master
            state[f.index] = {**entry, "shard_start": f.start, "shard_stop": f.stop, "numel": f.param.numel()}
        groups = []
        for group, members in zip(self.inner.param_groups, self._group_params):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append(
                {**hyper, "params": [i for i, _ in members], "param_names": [n for _, n in members]}
            )
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class (same or no sharding) or by torch's AdamW on the same model."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.inner.param_groups):
            raise ValueError(
                f"optimizer state has {len(saved_groups)} parameter groups, this model has "
                f"{len(self.inner.param_groups)} (was optim.decay_norms_and_embeddings changed?)"
            )
        for group, saved in zip(self.inner.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
            group["betas"] = tuple(group["betas"])
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        for f in self.fragments:
            entry = saved_state.get(f.index)
            if entry is not None:
                self._load_fragment(f, entry)

    def _load_fragment(self, f: Fragment, entry: dict[str, Any]) -> None:
        start, stop = entry.get("shard_start", 0), entry.get("shard_stop", f.param.numel())
        if entry.get("numel", f.param.numel()) != f.param.numel():
            raise ValueError(
                f"optimizer state of {f.name} is for {entry['numel']} elements, the parameter has "
                f"{f.param.numel()}: the state belongs to another model or tensor-parallel layout"
            )
        if not (start <= f.start and f.stop <= stop):
            raise ValueError(
                f"optimizer state of {f.name} holds elements [{start}, {stop}), this rank needs "
                f"[{f.start}, {f.stop}): it was saved with another data-parallel layout; merge the "
                "ranks' states first (distributed_optimizer.merge_optimizer_states)"
            )

        def piece(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(-1)[f.start - start : f.stop - start].to(self.device, torch.float32)

        if "master_param" in entry and not f.is_view:
            f.master.copy_(piece(entry["master_param"]))
        elif not f.is_view:
            f.master.copy_(f.param.detach().view(-1)[f.start : f.stop])
        if "exp_avg" in entry:
            self.inner.state[f.master] = {
                "step": torch.as_tensor(entry["step"], dtype=torch.float32).clone(),
                "exp_avg": piece(entry["exp_avg"]).clone(),
                "exp_avg_sq": piece(entry["exp_avg_sq"]).clone(),
            }


# --------------------------------------------------------------------------------------------- fp16
class DynamicLossScaler:
    """fp16 loss scaling whose overflow decision is one all-reduced flag, so every rank agrees.

    A drop-in for the parts of torch.amp.GradScaler the trainer uses (scale, unscale_, step, update,
    state_dict). GradScaler checks only this rank's gradients, which under the distributed optimizer
    or tensor parallelism are a shard: ranks would disagree on skipping and their scales would drift
    apart. A step that does not happen, because of an overflow found here or because the loop
    skipped it for a non-finite loss, backs the scale off; `growth_interval` good steps in a row grow it.
    """

    def __init__(
        self,
        group: Group = None,
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        device: torch.device | str = "cpu",
    ):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1):
            raise ValueError(
                "loss scaler: need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1"
            )
        self.group = group
        self.device = torch.device(device)
        self.loss_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.growth_tracker = 0
        self.found_inf = False
        self._stepped = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    @torch.no_grad()
    def unscale_(self, optimizer: Any) -> bool:
        """Divide the gradients the optimizer will use by the scale; True if any rank overflowed."""
        inverse = 1.0 / self.loss_scale
        bad = torch.zeros(1, device=self.device)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse)
                    bad += (~torch.isfinite(p.grad)).any()
        self.found_inf = bool(all_reduce_(bad, self.group, op="max").item())
        return self.found_inf

    def step(self, optimizer: Any) -> None:
        if not self.found_inf:
            optimizer.step()
            self._stepped = True

    def update(self) -> None:
        if self.found_inf or not self._stepped:
            self.loss_scale = max(self.loss_scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.loss_scale *= self.growth_factor
                self.growth_tracker = 0
        self.found_inf, self._stepped = False, False

    def get_scale(self) -> float:
        return self.loss_scale

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.loss_scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.loss_scale = float(state["scale"])
        self.growth_tracker = int(state.get("growth_tracker", 0))
