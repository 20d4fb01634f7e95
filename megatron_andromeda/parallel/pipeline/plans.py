"""Pipeline schedules as plain data: what each rank computes and exchanges, in order, with no torch.

A plan is one rank's list of steps. A step is a `Compute` (forward or backward of one micro-batch
through one local model chunk) or a `Batch` of `Transfer`s posted together and waited on together
(one `batch_isend_irecv`). Keeping plans pure lets the same code drive training (`schedules.py`),
prove every layout free of deadlocks and mismatched messages in a unit test (`simulate`), and give
the benchmark the ideal bubble of the exact order that runs.

Naming: with p ranks and v chunks per rank, chunk c of rank r is virtual stage s = c * p + r, so a
micro-batch visits rank 0, 1, ..., p-1, then rank 0 again (chunk 1), and so on. Activations always
go to the next rank on that ring and gradients to the previous one.

Transfers are derived from the compute order by one rule: after each slot of computes, send what
the slot produced (to the ranks that consume it) and receive what the next slot needs. A send is a
rendezvous on NCCL and on gloo (it completes when the peer posts the matching receive) and messages
on a link are matched in posting order, so where a receive is posted matters: `simulate` runs all
ranks' plans against each other and checks that every plan completes and that both ends of every
message agree on what it carries. The test suite does so for every schedule up to 6 stages.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Compute:
    backward: bool
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{'B' if self.backward else 'F'}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Transfer:
    """One message: the activation (forward) or the gradient of (chunk, microbatch), to or from `peer`."""

    send: bool
    grad: bool
    chunk: int  # the local chunk whose output (act) or input gradient (grad) this is, or that consumes it
    microbatch: int
    peer: int  # pipeline rank of the other end


Batch = tuple[Transfer, ...]
Step = Compute | Batch


@dataclass(frozen=True)
class Layout:
    """Pipeline shape: p ranks, v chunks per rank (virtual stages = p * v), m micro-batches."""

    ranks: int
    chunks: int
    microbatches: int

    @property
    def stages(self) -> int:
        return self.ranks * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        return chunk * self.ranks + rank


# --------------------------------------------------------------------------------------------- compute orders
def compute_order(schedule: str, layout: Layout, rank: int, forward_only: bool = False) -> list[Compute]:
    """The order in which `rank` runs forwards and backwards under `schedule`."""
    return [c for slot in compute_slots(schedule, layout, rank, forward_only) for c in slot]


def compute_slots(
    schedule: str, layout: Layout, rank: int, forward_only: bool = False
) -> list[list[Compute]]:
    """The compute order cut into slots: each slot is followed by one batch of transfers.

    A slot is a single compute, except in the steady state of the interleaved schedule, where a
    forward and the backward after it share one (see `build_plan`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    forwards = [Compute(False, c, m) for c, m in _forward_sequence(layout)]
    backwards = [Compute(True, layout.chunks - 1 - c, m) for c, m in _forward_sequence(layout)]
    if forward_only:
        return [[f] for f in forwards]
    if schedule == "gpipe":
        return [[c] for c in forwards + backwards]
    warmup = min(len(forwards), warmup_forwards(layout, rank))
    steady = [[f, b] for f, b in zip(forwards[warmup:], backwards)]
    if schedule != "interleaved":
        steady = [[c] for pair in steady for c in pair]
    cooldown = backwards[len(forwards) - warmup :]
    return [[f] for f in forwards[:warmup]] + steady + [[b] for b in cooldown]


def _forward_sequence(layout: Layout) -> list[tuple[int, int]]:
    """(chunk, micro-batch) pairs in forward order: groups of p micro-batches through each chunk in turn.

    With one chunk this is simply micro-batch 0, 1, 2, ...; with v chunks a group of p micro-batches
    goes through chunk 0, then the same group through chunk 1 (they come back around the ring just
    in time: p forward steps later), and so on.
    """
    p, v = layout.ranks, layout.chunks
    group = p if v > 1 else layout.microbatches
    sequence = []
    for first in range(0, layout.microbatches, group):
        for chunk in range(v):
            sequence += [(chunk, m) for m in range(first, min(first + group, layout.microbatches))]
    return sequence


def warmup_forwards(layout: Layout, rank: int) -> int:
    """Forwards a rank runs before its first backward.

    1F1B: p - 1 - r, the micro-batches in flight ahead of rank r when the last rank starts its first
    backward. Interleaved: the last rank runs (v - 1) * p forwards (the first group through all its
    chunks but the last) before micro-batch 0 reaches the last virtual stage; the gradient then moves
    back one rank per steady slot, and a steady slot is a forward plus a backward, so rank r, p - 1 - r
    hops away, fits 2 * (p - 1 - r) more forwards in before its first backward.
    """
    p, v, r = layout.ranks, layout.chunks, rank
    if v == 1:
        return p - 1 - r
    if layout.microbatches == p:
        return v * p  # one group only: no later forwards to pair backwards with, so run all forwards first
    return (v - 1) * p + 2 * (p - 1 - r)


# --------------------------------------------------------------------------------------------- transfers
def build_plan(schedule: str, layout: Layout, rank: int, forward_only: bool = False) -> list[Step]:
    """The full step list of `rank`: its compute slots, each followed by one batch of transfers.

    After a slot, one batch sends everything the slot produced and receives everything the next
    slot needs. A slot is a single compute, except in the steady state of the interleaved schedule
    where it is a forward + backward pair: receiving the pair's gradient together with its
    activation (before the forward, not just before the backward) and sending the forward's output
    only after the backward is what keeps the wrap-around links free of cycles there. GPipe and
    1F1B need single-compute slots (pairing would make a rank wait for a gradient before sending
    the activation that produces it).
    """
    slots = compute_slots(schedule, layout, rank, forward_only)
    steps: list[Step] = []
    first = _batch([t for c in slots[0] for t in _receives(c, layout, rank)])
    if first:
        steps.append(first)
    for index, slot in enumerate(slots):
        steps += slot
        transfers = [t for c in slot for t in _sends(c, layout, rank)]
        if index + 1 < len(slots):
            transfers += [t for c in slots[index + 1] for t in _receives(c, layout, rank)]
        if transfers:
            steps.append(_batch(transfers))
    return steps


def _batch(transfers: list[Transfer]) -> Batch:
    """Canonical order (activations before gradients, sends before receives) on both ends of a link."""
    return tuple(sorted(transfers, key=lambda t: (t.grad, not t.send)))


def _sends(compute: Compute, layout: Layout, rank: int) -> Batch:
    stage = layout.stage(rank, compute.chunk)
    p = layout.ranks
    if not compute.backward and stage < layout.stages - 1:
        return (Transfer(True, False, compute.chunk, compute.microbatch, (rank + 1) % p),)
    if compute.backward and stage > 0:
        return (Transfer(True, True, compute.chunk, compute.microbatch, (rank - 1) % p),)
    return ()


def _receives(compute: Compute, layout: Layout, rank: int) -> Batch:
    stage = layout.stage(rank, compute.chunk)
    p = layout.ranks
    if not compute.backward and stage > 0:
        return (Transfer(False, False, compute.chunk, compute.microbatch, (rank - 1) % p),)
    if compute.backward and stage < layout.stages - 1:
        return (Transfer(False, True, compute.chunk, compute.microbatch, (rank + 1) % p),)
    return ()


# --------------------------------------------------------------------------------------------- simulation
@dataclass
class Timeline:
    """Result of `simulate`: per-rank busy time and finish time, and the overall makespan."""

    busy: list[float]
    finish: list[float]

    @property
    def makespan(self) -> float:
        return max(self.finish)

    def bubble(self, rank: int) -> float:
        """Idle share of `rank` over the whole step (the pipeline bubble it sees)."""
        return 1.0 - self.busy[rank] / self.makespan


def simulate(
    plans: Sequence[Sequence[Step]], layout: Layout, forward_cost=1.0, backward_cost=2.0
) -> Timeline:
    """Run every rank's plan against the others with rendezvous messages and fixed compute costs.

    Raises ValueError on a deadlock or when the two ends of a link disagree on which tensor a
    message carries. Communication is free, so the timeline gives the schedule's ideal bubble.
    """
    n = len(plans)
    clock, busy, position = [0.0] * n, [0.0] * n, [0] * n
    posted: dict[tuple[int, int, bool], list[tuple[tuple, float]]] = defaultdict(list)  # link -> labels
    my_index: dict[tuple[int, int], list[int]] = {}  # (rank, step) -> index of each op on its link
    progress = True
    while progress:
        progress = False
        for rank, plan in enumerate(plans):
            while position[rank] < len(plan):
                step = plan[position[rank]]
                if isinstance(step, Compute):
                    cost = backward_cost if step.backward else forward_cost
                    clock[rank] += cost
                    busy[rank] += cost
                elif not _try_batch(rank, position[rank], step, layout, clock, posted, my_index):
                    break
                position[rank] += 1
                progress = True
    stuck = [r for r in range(n) if position[r] < len(plans[r])]
    if stuck:
        detail = "; ".join(f"rank {r} at step {position[r]}: {plans[r][position[r]]}" for r in stuck)
        raise ValueError(f"deadlock: {detail}")
    return Timeline(busy=busy, finish=clock)


def _label(transfer: Transfer, layout: Layout, rank: int) -> tuple[str, int, int]:
    """The same name on both ends: which virtual stage produced the tensor, for which micro-batch."""
    stage = layout.stage(rank, transfer.chunk)
    if transfer.send:
        return ("grad" if transfer.grad else "act", stage, transfer.microbatch)
    return (
        ("grad", stage + 1, transfer.microbatch) if transfer.grad else ("act", stage - 1, transfer.microbatch)
    )


def _try_batch(rank, index, batch, layout, clock, posted, my_index) -> bool:
    """Post the batch once; complete it when every message has its counterpart (FIFO per link)."""
    key = (rank, index)
    if key not in my_index:
        slots = []
        for t in batch:
            src, dst = (rank, t.peer) if t.send else (t.peer, rank)
            link = posted[(src, dst, t.send)]
            slots.append(len(link))
            link.append((_label(t, layout, rank), clock[rank]))
        my_index[key] = slots
    done_at = clock[rank]
    for t, slot in zip(batch, my_index[key]):
        src, dst = (rank, t.peer) if t.send else (t.peer, rank)
        other = posted[(src, dst, not t.send)]
        if len(other) <= slot:
            return False
        mine, theirs = posted[(src, dst, t.send)][slot][0], other[slot][0]
        if mine != theirs:
            raise ValueError(f"link {src}->{dst} message {slot}: rank {rank} means {mine}, its peer {theirs}")
        done_at = max(done_at, other[slot][1])
    clock[rank] = done_at
    return True
