"""The local backend: worker processes computing shard gradients on shared-memory weights.

Lifetimes, written down where they happen:
- The parent creates three anonymous shared-memory segments (shm.py) in `start()`: `params` (the
  flat float64 weights, written by the parent after each update), `slots` (one float64 gradient
  slot per worker, written only by its worker) and `data` (the raw uint8 train and test sets,
  written once before any worker starts). They have no name in /dev/shm: each is freed when the
  last process holding it exits, so no way of dying can leak one. The parent keeps their
  descriptors until `close()`, to hand them to restarted workers.
- Workers (worker.py) attach once, when they start, from descriptors passed to them (whatever
  the start method), and never write `params` or `data`. They exit when the parent sends None,
  when their pipe closes, or when they notice their parent is gone (so a killed trainer leaves no
  orphans).
- Per step the parent sends each worker only the indices of its examples (a few hundred bytes);
  weights are never pickled.
- With reduce="workers" there is a fourth segment, `reduced`: after a barrier, worker k sums
  slice k of every slot into it (a reduce-scatter in shared memory), so the parent's serial part
  shrinks to the update. The sums are taken in the same order as the parent's, so both modes give
  bit-identical results.

Workers are plain Processes with one Pipe each rather than a multiprocessing.Pool: Pool waits
forever for a task whose worker was killed (cpython#96062), while `connection.wait` on the pipes
*and* the process sentinels sees a death at once.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import time
from array import array
from multiprocessing.connection import wait
from typing import Callable, Sequence

from . import faults
from .engine import (SerialTimer, StopRequested, Watchdog, WorkerCrashed, WorkerDied, WorkerError, batch_messages,
                     eval_ranges, reduce_sums)
from .kernels import floats
from .barrier import PipeBarrier
from .mnist import Split
from .network import parameter_count
from .shm import Segment
from .trace import NoTracer
from .worker import PARENTS_SIGNALS, slot_views, worker_main

START_METHODS = ("fork", "spawn", "forkserver")
REDUCERS = ("parent", "workers")
MAX_RESTARTS = 3  # attempts at one step before a worker that keeps dying ends the run
POLL = 0.25  # seconds between looks at the stop flag while waiting for the workers
STOP_GRACE = 2.0  # seconds the step in flight may take to finish once a stop is requested


class LocalEngine:
    """`with LocalEngine(...) as engine:` — gradient() and evaluate() run on `workers` processes."""

    def __init__(self, sizes: Sequence[int], train: Split, test: Split | None, workers: int,
                 start_method: str | None = None, warn: Callable[[str], None] | None = None, reduce: str = "parent"):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if reduce not in REDUCERS:
            raise ValueError(f"reduce must be one of {REDUCERS}")
        self.sizes, self.workers, self.reduce = list(sizes), workers, reduce
        # Held only until start() copies them into shared memory: dropping them before the workers
        # fork keeps 47 MB of image bytes from being counted again in every worker.
        self._splits: tuple[Split, Split] | None = (train, test or Split(b"", b""))
        self.train_count, self.test_count, self.pixels = train.count, test.count if test else 0, train.pixels
        self.size = parameter_count(sizes)
        self.context = mp.get_context(start_method)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.restarts = 0
        self.bytes_sent = self.bytes_received = 0  # pickled messages over the pipes, both ways
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's stop flag, once it has one
        self.tracer = NoTracer()  # the trainer's, with --trace
        self.serial = SerialTimer()  # the trainer adds its update to it too
        self.watchdog = Watchdog()  # how long a worker may take to answer (the trainer's --worker-timeout)
        self._segments: dict[str, Segment] = {}
        self._procs: list = []
        self._conns: list = []

    # ---- lifetime ----

    def __enter__(self) -> "LocalEngine":
        self.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        # On Ctrl-C or an error the workers' current work is worthless: stop them at once.
        self.close(graceful=kind is None)

    def start(self) -> None:
        train, test = self._splits
        self._splits = None
        blobs = [train.images, train.labels, test.images, test.labels]
        del train, test
        self._layout, offset = [], 0
        for blob in blobs:
            self._layout.append((offset, len(blob)))
            offset += len(blob)
        try:
            self._segments["params"] = Segment(8 * self.size)
            self._segments["slots"] = Segment(8 * self.size * self.workers)
            if self.reduce == "workers":
                self._segments["reduced"] = Segment(8 * self.size)
            self._segments["data"] = Segment(offset)
            data = self._segments["data"].buf
            for (start, length), blob in zip(self._layout, blobs):
                data[start : start + length] = blob
            del data, blobs
            # The parent never reads the data again: unmapping its copy leaves those pages charged
            # only to the workers that touch them. It keeps the descriptor, for workers started later.
            self._segments["data"].unmap()
            self._params = self._segments["params"].buf.cast("d")
            self._slots = slot_views(self._segments["slots"].buf, self.size, self.workers)
            if self.reduce == "workers":
                self._reduced = self._segments["reduced"].buf.cast("d")
            self._spawn()
        except BaseException:
            self.close(graceful=False)
            raise

    def _spawn(self) -> None:
        spec = {
            "segments": {key: seg.handle() for key, seg in self._segments.items()},
            "sizes": self.sizes,
            "layout": self._layout,
            "pixels": self.pixels,
            "workers": self.workers,
        }
        # A fresh barrier per generation of workers: one broken by a death is never reused. Pipes,
        # not multiprocessing's named semaphores, which SIGKILL to the group would leave in /dev/shm.
        barrier = self._barrier = PipeBarrier(self.workers) if self.reduce == "workers" else None
        # Workers (and the forkserver or resource tracker, if starting one now) start with SIGINT and
        # SIGHUP blocked (a signal mask survives fork and exec), so a Ctrl-C or a closed terminal
        # while a spawned worker is still importing cannot kill it or print a traceback; the worker
        # ignores both, then unblocks them. A signal meant for the trainer meanwhile stays pending
        # and is delivered when the mask is restored here.
        # The helpers are started first, with SIGHUP blocked: they do not ignore it themselves, and a
        # closed terminal must not kill them under the trainer. (Starting the resource tracker
        # unblocks SIGINT and SIGTERM in the caller when it is done, which would undo a mask set
        # before it for the workers after it; it ignores those two itself.)
        method = self.context.get_start_method()
        helpers = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            if method == "forkserver":
                from multiprocessing import forkserver

                forkserver.ensure_running()  # starts the resource tracker too
            elif method == "spawn":
                from multiprocessing import resource_tracker

                resource_tracker.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, helpers)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, PARENTS_SIGNALS)
        try:
            for k in range(self.workers):
                parent_end, child_end = self.context.Pipe()
                proc = self.context.Process(target=worker_main, args=(child_end, spec, k, barrier),
                                            name=f"parallel_nn-worker-{k}", daemon=True)
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            for conn in self._conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if getattr(self, "_barrier", None) is not None:
            self._barrier.close()
            self._barrier = None

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, then close the parent's descriptors: the memory goes with the last user."""
        self._stop_workers(graceful)
        for name in ("_params", "_slots", "_reduced"):
            if hasattr(self, name):
                views = getattr(self, name)
                for view in views if isinstance(views, list) else [views]:
                    view.release()
                delattr(self, name)
        for segment in self._segments.values():
            segment.close()  # a second close() is a no-op
        self._segments = {}

    def _restart(self) -> None:
        self.restarts += 1
        self._stop_workers(graceful=False)
        self._spawn()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def nodes(self) -> int:
        return 1

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self._params[:] = array("d", params)

    def _run(self, messages: list, kind: str) -> dict[int, tuple]:
        """Send each worker its message (None: nothing to do); collect the replies, watching for
        deaths and for workers that stop answering (the watchdog's limit for this kind of work)."""
        pending, sent = {}, time.perf_counter()
        with self.serial, self.tracer.span("dispatch"):
            for k, message in enumerate(messages):
                if message is not None:
                    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)  # what conn.send() does, counted
                    try:
                        self._conns[k].send_bytes(payload)
                    except OSError:
                        raise WorkerDied(f"worker {k} is gone")
                    pending[k] = self._procs[k].sentinel
                    self.bytes_sent += len(payload)
        faults.point("dispatch" if kind == "grad" else "evaluate")
        replies, deadline, stopping = {}, sent + self.watchdog.limit(kind), False
        with self.tracer.span("wait"):
            while pending:
                if not stopping and self.stop_requested():
                    # Ctrl-C stops within seconds: the step in flight gets STOP_GRACE to finish
                    stopping, deadline = True, min(deadline, time.perf_counter() + STOP_GRACE)
                ready = set(wait([self._conns[k] for k in pending] + list(pending.values()),
                                 min(POLL, max(0.0, deadline - time.perf_counter()))))
                if not ready:
                    if time.perf_counter() < deadline:
                        continue
                    if stopping:
                        for k in pending:
                            self._procs[k].kill()  # a worker that cannot answer is ended with the run
                        raise StopRequested(f"stopped while worker {', '.join(map(str, sorted(pending)))} had not answered")
                    raise self._unresponsive(sorted(pending), deadline - sent)
                for k in list(pending):
                    conn = self._conns[k]
                    if conn in ready:
                        try:
                            payload = conn.recv_bytes()
                        except (EOFError, OSError):  # its end of the pipe closed: it died
                            raise self._death(k)
                        self.bytes_received += len(payload)
                        reply = pickle.loads(payload)
                        if reply[0] == "error":
                            raise WorkerError(k, reply[1])
                        replies[k] = reply
                        del pending[k]
                        self.watchdog.answered(kind, time.perf_counter() - sent)
                    elif pending[k] in ready:
                        raise self._death(k)
                if kind == "grad" and len(replies) == 1:
                    faults.point("wait")
        for k in sorted(replies):
            if replies[k][-1]:  # the worker's spans, on this machine's clock
                self.tracer.worker(k, f"worker {k}", replies[k][-1])
        return replies

    def _unresponsive(self, silent: list[int], waited: float) -> WorkerDied:
        """Workers that did not answer in time are as good as dead (stopped, deadlocked, swapped
        out): kill them now (SIGKILL reaches a stopped process too), and let the step be redone."""
        for k in silent:
            self._procs[k].kill()
        names = ", ".join(f"{k} (pid {self._procs[k].pid})" for k in silent)
        return WorkerDied(f"worker {names} did not answer within {waited:.0f} s (--worker-timeout); killed it")

    def _death(self, k: int) -> WorkerDied:
        proc = self._procs[k]
        proc.join(1.0)  # the pipe and the sentinel signal a death before its exit status is collected
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"worker {k} (pid {proc.pid}) died: {how}")

    def _run_recovering(self, messages: list, kind: str) -> dict[int, tuple]:
        for attempt in range(MAX_RESTARTS + 1):
            try:
                return self._run(messages, kind)
            except WorkerDied as e:
                if self.stop_requested():  # stopping: the group's SIGTERM or SIGHUP reached the workers too
                    raise StopRequested(str(e)) from e
                if attempt == MAX_RESTARTS:
                    raise WorkerCrashed(f"{e}; gave up after {MAX_RESTARTS} restarts") from e
                self.warn(f"{e}; restarting the workers and redoing the step")
                self._restart()
        raise AssertionError("unreachable")

    def gradient(self, indices: Sequence[int], augment: bytes | None = None) -> tuple[list[float], float, int]:
        """(sum over `indices` of the per-example gradients, flat; summed loss; number correct).

        `augment`: optional augmentation, mnist.AUGMENT_BYTES per example (mnist.decode_batch).
        """
        # Every worker takes part in a workers' reduction (an empty shard contributes zeros).
        messages = [None if m is None else ("grad", *m, self.tracer.active)
                    for m in batch_messages(indices, augment, self.workers, everyone=self.reduce == "workers")]
        replies = self._run_recovering(messages, "grad")
        faults.point("reduce")
        with self.serial, self.tracer.span("reduce"):
            done = sorted(replies)  # a fixed order: reproducible for a given worker count
            if self.reduce == "workers":
                total = floats(self._reduced)
            else:
                total = reduce_sums([self._slots[k] for k in done])
            loss = sum(replies[k][1] for k in done)
            correct = sum(replies[k][2] for k in done)
        return total, loss, correct

    def evaluate(self, params: Sequence[float] | None = None) -> tuple[float, list[int]]:
        """(summed test loss, predicted class per test image), the test set split across the workers."""
        if params is not None:
            self.set_params(params)
        replies = self._run_recovering([None if r is None else ("eval", *r, self.tracer.active)
                                        for r in eval_ranges(self.test_count, self.workers)], "eval")
        loss, predictions = 0.0, []
        for k in sorted(replies):
            loss += replies[k][1]
            predictions.extend(replies[k][2])
        return loss, predictions
