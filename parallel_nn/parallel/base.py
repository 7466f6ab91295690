"""What the trainer sees of a backend (`Engine`), and what goes wrong with workers.

An engine runs one data-parallel step: `gradient(indices, augment)` returns the *sum* over the batch
of the per-example gradients (flat), the summed loss and the number correct; `evaluate()` runs
the test set. Two engines implement `Engine`: local/pool.py (worker processes on shared memory,
the default) and ray/actors.py (Ray actors, possibly on many machines); backends.py, a floor
above them, chooses one. This module knows neither; what both compute is in shards.py.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

from parallel_nn import UserError
from parallel_nn.parallel.trace import NoTracer


class SerialTimer:
    """Time the parent spends on the serial path (dispatch, combining gradients, the update).

    Both wall time and the parent's CPU time are kept: on a machine with fewer cores than
    workers, woken workers preempt the parent mid-dispatch, which inflates the wall time but not
    the work a bigger machine would have to do serially.
    """

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.thread_time() - self._cpu


class Watchdog:
    """How long the parent waits for a worker's answer before it treats the worker as dead.

    A stopped (SIGSTOP), deadlocked or swapped-out worker never answers, and waiting for it would
    hang the run for ever. The limit is either fixed (`--worker-timeout`) or scaled from what was
    measured: `factor` times the slowest answer seen so far for the same `work` ("grad", a step, or
    "eval": they differ a hundredfold), never below `floor` (the first step includes the JIT's
    warm-up and, under spawn, the workers' imports).
    """

    def __init__(self, fixed: Optional[float] = None, floor: float = 60.0, factor: float = 20.0):
        self.fixed, self.floor, self.factor = fixed, floor, factor
        self.slowest: dict[str, float] = {}

    def limit(self, work: str) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(self.floor, self.factor * self.slowest.get(work, 0.0))

    def answered(self, work: str, seconds: float) -> None:
        self.slowest[work] = max(seconds, self.slowest.get(work, 0.0))


class Engine:
    """What the trainer sees of either backend: `with engine:` starts its workers and stops them,
    `set_params`, `gradient` and `evaluate` run the step, and these attributes it may set or read."""

    def __init__(self, sizes: Sequence[int], workers: int, warn: Optional[Callable[[str], None]] = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.sizes, self.workers = list(sizes), workers
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.restarts = 0  # times the workers were replaced
        self.bytes_sent = self.bytes_received = 0  # what travelled between the parent and the workers
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's stop flag, once it has one
        self.tracer = NoTracer()  # the trainer's, with --trace
        self.serial = SerialTimer()  # the parent's serial path; the trainer adds its update to it
        self.watchdog = Watchdog()  # how long a worker may take to answer (the trainer's --worker-timeout)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, value, tb) -> None:
        # On Ctrl-C or an error the workers' current work is worthless: stop them at once.
        self.close(graceful=exc_type is None)

    def start(self) -> None:
        raise NotImplementedError

    def close(self, graceful: bool = True) -> None:
        raise NotImplementedError


class WorkerDied(Exception):
    """A worker (process or actor) went away before answering."""


class WorkerError(UserError):
    """A worker's computation raised (a MemoryError, a bug): one line for the user, and the
    worker's whole traceback kept for --debug. The trainer saves a checkpoint before stopping."""

    def __init__(self, k: int, details: str):
        last = details.strip().splitlines()[-1] if details.strip() else "no details"
        super().__init__(f"worker {k} failed: {last}")
        self.details = details


class StopRequested(Exception):
    """A worker died after the run was asked to stop (SIGTERM or SIGHUP to the process group reach
    the workers too): part of stopping, not a fault to recover from."""


class WorkerCrashed(UserError):
    """Workers kept dying: the run stops (the trainer saves a resumable checkpoint first)."""
