"""No silent hangs: a communication that makes no progress for `parallel.comm_timeout_s` ends the run.

A pipeline that waits on a peer which never answers (a crashed, stalled or mis-scheduled rank) would
otherwise block forever. Each rank runs a small daemon thread. Blocking waits are wrapped in
`watchdog.watch(label)`; when one lasts longer than the timeout, or a wait raises, the rank

1. writes a header and the Python stack of every thread (faulthandler) to stderr, and to
   `dump_dir/rank<N>.txt` when a dump directory is given;
2. raises an abort flag in the job's key-value store (the one torch.distributed was initialised
   with), so that every other rank's thread dumps its own stacks too, including a rank that is stuck
   in computation rather than communication: that rank is usually the culprit;
3. waits briefly for the others' dumps and exits the process with `EXIT_CODE`.

Exiting from the watchdog thread is deliberate: the main thread is blocked inside a C++ wait and
cannot be interrupted with an exception.

The thread must be stopped and joined before the interpreter exits (`close`; ParallelContext.close
calls it for the watchdog the pipeline schedule made, and an atexit hook does so for any other).
A daemon thread still polling the store at exit is killed by Python when its store call returns
(pthread_exit on a thread inside a pybind11 `gil_scoped_release`), and that unwinding through a
noexcept destructor aborts the whole process with "terminate called without an active
exception": an 8-process run lost a rank that way after its last step (issue 21).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

EXIT_CODE = 124  # the conventional "timed out" status
ABORT_KEY = "andromeda/watchdog/abort"
DUMPED_KEY = "andromeda/watchdog/dumped"
PROGRESS_PREFIX = "andromeda/watchdog/progress/"  # + rank: "<count>\t<label>" of its last announced wait


def default_store() -> dist.Store | None:
    """The store of the default process group, or None outside a distributed run.

    torch exposes it only through a private helper; without it the watchdog still dumps the local
    stacks and exits, it just cannot ask the other ranks to dump theirs.
    """
    if not dist.is_initialized():
        return None
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except RuntimeError:
        return None


class Watchdog:
    """Times the waits wrapped in `watch` and takes the whole job down, with stacks, when one hangs."""

    def __init__(
        self,
        timeout_s: float,
        *,
        rank: int = 0,
        world_size: int = 1,
        store: dist.Store | None = None,
        dump_dir: str | Path | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"parallel.comm_timeout_s={timeout_s} must be positive")
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.poll_s = min(max(timeout_s / 10, 0.1), 5.0)
        self._lock = threading.Lock()
        self._armed: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._aborting = threading.Lock()  # held by the one thread that takes the job down
        self._thread: threading.Thread | None = None
        self._announced = 0  # waits this rank announced to the others (watch(..., announce=True))

    @classmethod
    def for_job(cls, timeout_s: float, dump_dir: str | Path | None = None) -> Watchdog:
        """A watchdog wired to the default process group's rank, size and store."""
        if not dist.is_initialized():
            return cls(timeout_s, dump_dir=dump_dir)
        return cls(
            timeout_s,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            store=default_store(),
            dump_dir=dump_dir,
        )

    # ------------------------------------------------------------------------------------------ use
    @contextmanager
    def watch(self, label: str, *, announce: bool = False) -> Iterator[None]:
        """Guard a blocking wait; a failure inside it (a peer's timeout error) also aborts the job.

        `announce` records the wait in the job's store before entering it (one small write), so that
        a rank stuck in it can name the ranks that never arrived: use it for the few waits every rank
        passes once per step (the data-parallel reductions), not for per-message waits.
        """
        self._start()
        if announce:
            self._announce(label)
        with self._lock:
            self._armed = (label, time.monotonic())
        try:
            yield
        except Exception as err:  # a backend error in a wait: the job cannot continue either
            self.abort(f"{label} failed: {type(err).__name__}: {err}{self.laggards()}")
        finally:
            with self._lock:
                self._armed = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and join it (at most timeout_s, then say so); safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return
        atexit.unregister(self.close)
        thread.join(timeout_s)
        if thread.is_alive():  # inside a store call that does not return: say so rather than hang
            print(
                f"[rank {self.rank}] warning: the pipeline watchdog thread did not stop within "
                f"{timeout_s:g} s (blocked on the job's store?)",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------------------------------ thread
    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            # A daemon, so that a thread stuck in a store call can never keep the process alive;
            # joined by close(), and at the latest by atexit, which runs before Python kills daemons.
            self._thread = threading.Thread(target=self._run, name="andromeda-watchdog", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() - armed[1] > self.timeout_s:
                self.abort(
                    f"no progress for {time.monotonic() - armed[1]:.1f} s on {armed[0]} "
                    f"(parallel.comm_timeout_s={self.timeout_s:g}){self.laggards()}"
                )
            reason = self._abort_requested(armed is not None)
            if reason is not None and self._aborting.acquire(blocking=False):
                self._dump(f"watchdog: {reason}; this rank's stacks at that moment")
                self._count_dump()
                self._exit()

    def _abort_requested(self, waiting: bool) -> str | None:
        if self.store is None:
            return None
        try:
            if self.store.check([ABORT_KEY]):
                return f"rank {self.store.get(ABORT_KEY).decode()} aborted the job"
        except Exception:  # the store died with its host rank while we wait on a peer: going down
            if waiting:
                return "the job's store is unreachable (its host rank exited)"
        return None

    # ------------------------------------------------------------------------------------------ progress
    def _announce(self, label: str) -> None:
        self._announced += 1
        if self.store is not None:
            with contextlib.suppress(Exception):  # progress is a diagnostic: never fail a step over it
                self.store.set(f"{PROGRESS_PREFIX}{self.rank}", f"{self._announced}\t{label}")

    def laggards(self) -> str:
        """'; ranks that have not reached it: ...' naming the ranks behind this rank's last announced
        wait (with the last wait each did reach), or '' when none is behind or nothing is known."""
        if self.store is None or not self._announced:
            return ""
        behind = []
        try:
            for rank in range(self.world_size):
                key = f"{PROGRESS_PREFIX}{rank}"
                if not self.store.check([key]):
                    behind.append(f"rank {rank} (none of these waits yet)")
                    continue
                count, label = self.store.get(key).decode().split("\t", 1)
                if int(count) < self._announced:
                    behind.append(f"rank {rank} (last reached: {label})")
        except Exception:  # the store is gone: the stacks will have to tell
            return ""
        return f"; ranks that have not reached it: {', '.join(behind)}" if behind else ""

    # ------------------------------------------------------------------------------------------ abort
    def abort(self, reason: str) -> NoReturn:
        """Dump this rank's stacks, ask every rank to dump theirs, wait for them, exit with EXIT_CODE.

        Only the first caller proceeds; a second one (the main thread's wait failing because the
        peers exit while the watchdog thread is already aborting) waits for the exit.
        """
        if not self._aborting.acquire(blocking=False):
            while True:
                time.sleep(1.0)
        self._dump(f"watchdog: {reason}")
        if self.store is not None:
            try:
                self.store.set(ABORT_KEY, str(self.rank))
                self._count_dump()
                deadline = time.monotonic() + max(10.0, 5 * self.poll_s)
                while self.store.add(DUMPED_KEY, 0) < self.world_size and time.monotonic() < deadline:
                    time.sleep(self.poll_s / 2)
            except Exception:  # other ranks are already gone; nothing left to wait for
                pass
        self._exit()

    def _dump(self, header: str) -> None:
        title = f"[rank {self.rank}] {header}\n"
        sys.stdout.flush()
        sys.stderr.write(title)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            target = self.dump_dir / f"rank{self.rank}.txt"
            with tempfile.NamedTemporaryFile("w", dir=self.dump_dir, delete=False, suffix=".tmp") as tmp:
                tmp.write(title)
                tmp.flush()
                faulthandler.dump_traceback(file=tmp, all_threads=True)
            os.replace(tmp.name, target)

    def _count_dump(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):  # store already gone: nobody is waiting for the count
                self.store.add(DUMPED_KEY, 1)

    @staticmethod
    def _exit() -> NoReturn:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
