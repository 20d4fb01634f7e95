"""Activation and gradient exchange between pipeline neighbours, on gloo and NCCL alike.

Every message between stages is one tensor of a shape and dtype known before the step starts: the
hidden states of one micro-batch, (micro_batch_size, seq_length, hidden_size), or their gradient.
(Under sequence parallelism, seq_length / tensor: each tensor rank exchanges its own sequence chunk
with the same tensor rank of the neighbouring stage, see parallel/parallelize.py.) So a receiver
allocates its buffer up front and no shape handshake precedes the data.

One `exchange` call posts a whole batch of sends and receives with `batch_isend_irecv` and waits for
all of them: NCCL runs a batch as one group (no ordering deadlock between a send and a receive to
the same peer), gloo posts them asynchronously. Messages on one link are matched in the order they
are posted, which the schedule's plans keep consistent on both ends (see plans.py). Every wait runs
under the watchdog, so a peer that never answers ends the job with stacks instead of a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_andromeda.parallel.watchdog import Watchdog


@dataclass(frozen=True)
class Message:
    """One side of one transfer: `tensor` to send, or None to receive from `peer` (a pipeline rank)."""

    peer: int
    tensor: torch.Tensor | None = None
    what: str = ""  # for error messages and watchdog labels, e.g. "activation of micro-batch 3"


class PipelineComm:
    """This rank's link to the other ranks of its pipeline."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        global_ranks: Sequence[int],
        rank: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        watchdog: Watchdog | None = None,
    ):
        self.group = group
        self.global_ranks = list(global_ranks)  # pipeline rank -> global rank
        self.rank = rank
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.watchdog = watchdog

    @property
    def size(self) -> int:
        return len(self.global_ranks)

    def exchange(self, messages: Sequence[Message]) -> list[torch.Tensor]:
        """Post every send and receive of `messages` at once, wait for all; return the received tensors.

        Sends and receives are posted in the given order, which is the order their peers expect.
        """
        if not messages:
            return []
        ops, received = [], []
        for msg in messages:
            peer = self.global_ranks[msg.peer]
            if msg.tensor is not None:
                ops.append(dist.P2POp(dist.isend, self._checked(msg), peer, self.group))
            else:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
                received.append(buffer)
        label = "; ".join(
            f"{'send' if m.tensor is not None else 'receive'} {m.what} (rank {m.peer})" for m in messages
        )
        works = dist.batch_isend_irecv(ops)
        if self.watchdog is None:
            for work in works:
                work.wait()
        else:
            with self.watchdog.watch(f"pipeline rank {self.rank}: {label}"):
                for work in works:
                    work.wait()
        return received

    def _checked(self, msg: Message) -> torch.Tensor:
        tensor = msg.tensor
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"pipeline rank {self.rank} would send {msg.what} of shape {tuple(tensor.shape)} "
                f"{tensor.dtype} but the receiver expects {self.shape} {self.dtype}: every stage must return "
                "(train.micro_batch_size, data.seq_length, model.hidden_size) hidden states in the "
                "parameters' dtype (data.seq_length / parallel.tensor under sequence parallelism)"
            )
        return tensor.detach().contiguous()
