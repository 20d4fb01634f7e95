"""Activation recomputation: keep less in memory during the forward, recompute it in the backward.

`apply_recompute(model, mode)` changes an unmodified model in place:

- "full": every transformer block keeps only its input; its whole forward runs again in the
  backward (memory per layer drops from all intermediates to one (B, T, D) tensor);
- "selective": only the attention core (softmax(q k^T) v, whose (B, H, T, T) intermediates grow
  with the square of the sequence) is recomputed, the cheap-to-store, expensive-to-redo matmuls
  are kept (Korthikanti et al., 2022);
- "none": nothing changes.

Gradients are unchanged. Dropout replays the same masks: torch's checkpoint restores the default
generator's state, and the tensor-parallel streams of `RNGTracker` (drawn by attention cores of a
tensor-parallel model inside a block) are rewound to their state at the forward for the recompute.

The module's `forward` is replaced on the instance rather than wrapped in a new module, so parameter
names (and with them checkpoints, sharding rules and optimizer groups) do not change. The wrapper
looks the class's forward up at every call instead of keeping the bound method it replaced: a
kernel swap that changes the module's class (the flash attention core) is honoured whichever came
first. `megatron_andromeda.builder` applies recomputation after the kernels, as documented there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_andromeda.models.attention import CoreAttention
from megatron_andromeda.models.layers import ParallelBlock, SequentialBlock
from megatron_andromeda.parallel.random import RNGTracker

MODES = ("none", "full", "selective")
_TARGETS: dict[str, tuple[type[nn.Module], ...]] = {
    "full": (ParallelBlock, SequentialBlock),
    "selective": (CoreAttention,),
}


def apply_recompute(model: nn.Module, mode: str, rng: RNGTracker | None = None) -> nn.Module:
    """Recompute every block ("full") or attention core ("selective") of `model` in the backward.

    Pass the parallel context's `rng` tracker for a tensor-parallel model with dropout. Returns
    the model; applying a mode twice, or two different modes, is an error.
    """
    if mode not in MODES:
        raise ValueError(f"parallel.recompute={mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return model
    for module in model.modules():
        if isinstance(module, _TARGETS[mode]):
            if getattr(module, "recompute", None):
                raise ValueError(f"{type(module).__name__} already recomputes ({module.recompute})")
            module.forward = _recomputed(module, rng)
            module.recompute = mode
    return model


def _recomputed(module: nn.Module, rng: RNGTracker | None) -> Callable:
    def forward(*args, **kwargs):
        return type(module).forward(module, *args, **kwargs)  # the class's forward now, not at wrap time

    def run(*args, **kwargs):
        if not module.training or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(
            forward, *args, use_reentrant=False, context_fn=partial(_rng_contexts, rng), **kwargs
        )

    return run


def _rng_contexts(rng: RNGTracker | None):
    """(forward context, recompute context): the recompute sees the tracker as the forward saw it."""
    if rng is None:
        return nullcontext(), nullcontext()
    return nullcontext(), _replayed(rng, rng.get_states())


@contextmanager
def _replayed(rng: RNGTracker, states: dict) -> Iterator[None]:
    current = rng.get_states()
    rng.set_states(states)
    try:
        yield
    finally:
        rng.set_states(current)
