"""Named random streams, so that dropout differs across tensor ranks exactly where it must.

Two kinds of randomness meet under tensor parallelism:

- replicated activations (the residual stream without sequence parallelism) are computed by every
  rank of a tensor group and must get the *same* dropout mask: they use torch's default generator,
  which the trainer seeds identically on every rank;
- activations that are split across the group (attention probabilities of each rank's heads, the
  residual stream's sequence shards under sequence parallelism) must get *independent* masks: they
  run inside `tracker.fork("tensor-parallel")`, a stream seeded per tensor rank.

`fork` swaps the stream's state into the default generator of the tensor's device and back, so
kernels that draw from the default generator (SDPA's dropout, nn.Dropout) need no changes.
Activation recomputation must replay the same masks: save `get_states()` before the first forward
and `set_states()` before recomputing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_TP_SEED_OFFSET = 2718  # keeps the tensor-parallel streams away from the default seed
_PP_SEED_STRIDE = 100


def tensor_parallel_seed(seed: int, tp_rank: int, pp_rank: int) -> int:
    """The seed of the tensor-parallel stream: distinct for every (tensor, pipeline) position."""
    return seed + _TP_SEED_OFFSET + _PP_SEED_STRIDE * pp_rank + tp_rank


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return "cpu"


def _get_state(key: str) -> torch.Tensor:
    if key == "cpu":
        return torch.get_rng_state()
    return torch.cuda.get_rng_state(key)


def _set_state(key: str, state: torch.Tensor) -> None:
    if key == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, key)


def _seeded_state(key: str, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=key)
    generator.manual_seed(seed)
    return generator.get_state()


class RNGTracker:
    """Holds named random streams, one state per stream and device, created lazily from a seed."""

    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}
        self._states: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._seeds:
            raise ValueError(f"random stream {name!r} already exists")
        self._seeds[name] = seed

    @property
    def names(self) -> list[str]:
        return list(self._seeds)

    @contextmanager
    def fork(self, name: str = "tensor-parallel", device: torch.device | str = "cpu") -> Iterator[None]:
        """Run the body with the default generator of `device` replaced by stream `name`."""
        if name not in self._seeds:
            raise KeyError(f"unknown random stream {name!r} (known: {', '.join(self._seeds) or 'none'})")
        key = _device_key(torch.device(device))
        state = self._states.get((name, key))
        if state is None:
            state = _seeded_state(key, self._seeds[name])
        outside = _get_state(key)
        _set_state(key, state)
        try:
            yield
        finally:
            self._states[(name, key)] = _get_state(key)
            _set_state(key, outside)

    def get_states(self) -> dict[tuple[str, str], torch.Tensor]:
        """A copy of every materialised stream state (for checkpoints and recomputation)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[tuple[str, str], torch.Tensor]) -> None:
        unknown = {name for name, _ in states} - set(self._seeds)
        if unknown:
            raise KeyError(f"random streams {sorted(unknown)} were never added to this tracker")
        self._states = {k: v.clone() for k, v in states.items()}
