"""Run a function on N local processes with torch.distributed set up (gloo on CPU by default).

Distributed tests use it to compare a sharded run with the single-process result on a laptop:

    results = run_distributed(check_fn, world_size=2, config=cfg)   # check_fn(config=cfg) on 2 ranks

`fn` must be importable by name (a module-level function) because the processes are spawned, not
forked (forking a process that already runs torch's thread pools can deadlock). Each rank gets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like under torchrun; by default the
default process group is initialised for it. Results travel back through torch.save, so tensors
are fine. The first failing rank's traceback is re-raised here and the other ranks are stopped.
"""

from __future__ import annotations

import io
import os
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, backend, port, init, timeout_s, results, kwargs) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    try:
        torch.set_num_threads(1)
        if init:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        buffer = io.BytesIO()
        torch.save(fn(**kwargs), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt from a stuck collective
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    backend: str = "gloo",
    *,
    init_process_group: bool = True,
    timeout_s: float = 3600.0,
    **kwargs: Any,
) -> list[Any]:
    """Call fn(**kwargs) on `world_size` spawned ranks; return their results ordered by rank.

    `timeout_s` is a hang guard (and the process group's timeout), not a speed limit: a loaded
    machine may run a test many times slower than a quiet one.
    """
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = _free_port()
    procs = [
        spawn.Process(
            target=_worker,
            args=(fn, rank, world_size, backend, port, init_process_group, timeout_s, results, kwargs),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        return _collect(procs, results, time.monotonic() + timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)


def _collect(procs: list, results: Any, deadline: float) -> list[Any]:
    outputs: dict[int, Any] = {}
    while len(outputs) < len(procs):
        try:
            rank, ok, payload = results.get(timeout=0.5)
        except queue_lib.Empty:
            dead = [p.name for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
            if dead:
                raise DistributedTestError(f"{', '.join(dead)} exited without a result") from None
            if time.monotonic() > deadline:
                raise DistributedTestError(
                    f"timed out waiting for ranks {sorted(set(range(len(procs))) - set(outputs))}"
                ) from None
            continue
        if not ok:
            raise DistributedTestError(f"rank {rank} failed:\n{payload}")
        outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [outputs[rank] for rank in range(len(procs))]
