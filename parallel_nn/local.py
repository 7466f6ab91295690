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
import time
from array import array
from multiprocessing.connection import wait
from typing import Callable, Sequence

from . import faults
from .barrier import PipeBarrier
from .engine import (Engine, StopRequested, WorkerCrashed, WorkerDied, WorkerError, batch_messages, eval_ranges,
                     reduce_sums)
from .kernels import floats
from .mnist import Split
from .network import parameter_count
from .shm import Segment
from .worker import PARENTS_SIGNALS, slot_views, worker_main

START_METHODS = ("fork", "spawn", "forkserver")
REDUCERS = ("parent", "workers")
MAX_RESTARTS = 3  # attempts at one step before a worker that keeps dying ends the run
POLL = 0.25  # seconds between looks at the stop flag while waiting for the workers
STOP_GRACE = 2.0  # seconds the step in flight may take to finish once a stop is requested


class WorkerPool:
    """The shared segments and the worker processes on them: made, restarted and stopped.

    After `start`, `params` is the weights' float64 view, `slots[k]` worker k's gradient slot (raw
    bytes), `reduced` the reduce-scatter's result (reduce="workers" only), `conns[k]` and
    `procs[k]` worker k's pipe and process.
    """

    def __init__(self, context, sizes: Sequence[int], workers: int, reduce: str, pixels: int):
        self.context, self.sizes, self.workers, self.reduce, self.pixels = context, list(sizes), workers, reduce, pixels
        self.size = parameter_count(sizes)
        self.segments: dict[str, Segment] = {}
        self.procs: list = []
        self.conns: list = []
        self.barrier: PipeBarrier | None = None

    def start(self, blobs: list) -> None:
        """Copy `blobs` (train images, labels, test images, labels) into shared memory; start the workers."""
        self.layout, offset = [], 0
        for blob in blobs:
            self.layout.append((offset, len(blob)))
            offset += len(blob)
        self.segments["params"] = Segment(8 * self.size)
        self.segments["slots"] = Segment(8 * self.size * self.workers)
        if self.reduce == "workers":
            self.segments["reduced"] = Segment(8 * self.size)
        self.segments["data"] = Segment(offset)
        data = self.segments["data"].buf
        for (start, length), blob in zip(self.layout, blobs):
            data[start : start + length] = blob
        del data, blobs
        # The parent never reads the data again: unmapping its copy leaves those pages charged
        # only to the workers that touch them. It keeps the descriptor, for workers started later.
        self.segments["data"].unmap()
        self.params = self.segments["params"].buf.cast("d")
        self.slots = slot_views(self.segments["slots"].buf, self.size, self.workers)
        if self.reduce == "workers":
            self.reduced = self.segments["reduced"].buf.cast("d")
        self.spawn()

    def spawn(self) -> None:
        spec = {
            "segments": {key: seg.handle() for key, seg in self.segments.items()},
            "sizes": self.sizes,
            "layout": self.layout,
            "pixels": self.pixels,
            "workers": self.workers,
        }
        # A fresh barrier per generation of workers: one broken by a death is never reused. Pipes,
        # not multiprocessing's named semaphores, which SIGKILL to the group would leave in /dev/shm.
        self.barrier = PipeBarrier(self.workers) if self.reduce == "workers" else None
        self._start_helpers()
        # Workers start with SIGINT and SIGHUP blocked (a signal mask survives fork and exec), so a
        # Ctrl-C or a closed terminal while a spawned worker is still importing cannot kill it or
        # print a traceback; the worker ignores both, then unblocks them. A signal meant for the
        # trainer meanwhile stays pending and is delivered when the mask is restored here.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, PARENTS_SIGNALS)
        try:
            for k in range(self.workers):
                parent_end, child_end = self.context.Pipe()
                proc = self.context.Process(target=worker_main, args=(child_end, spec, k, self.barrier),
                                            name=f"parallel_nn-worker-{k}", daemon=True)
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _start_helpers(self) -> None:
        """The forkserver or resource tracker that the start method needs, started now with SIGHUP
        blocked: they do not ignore it themselves, and a closed terminal must not kill them under
        the trainer. (Starting the resource tracker unblocks SIGINT and SIGTERM in the caller when
        it is done, which would undo a mask set before it for the workers; it ignores those two.)"""
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

    def stop(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self.barrier is not None:
            self.barrier.close()
            self.barrier = None

    def restart(self) -> None:
        self.stop(graceful=False)
        self.spawn()

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, then close the parent's descriptors: the memory goes with the last user."""
        self.stop(graceful)
        for name in ("params", "slots", "reduced"):
            if hasattr(self, name):
                views = getattr(self, name)
                for view in views if isinstance(views, list) else [views]:
                    view.release()
                delattr(self, name)
        for segment in self.segments.values():
            segment.close()  # a second close() is a no-op
        self.segments = {}


class LocalEngine(Engine):
    """`with LocalEngine(...) as engine:` — gradient() and evaluate() run on `workers` processes."""

    def __init__(self, sizes: Sequence[int], train: Split, test: Split | None, workers: int,
                 start_method: str | None = None, warn: Callable[[str], None] | None = None, reduce: str = "parent"):
        super().__init__(sizes, workers, warn)
        if reduce not in REDUCERS:
            raise ValueError(f"reduce must be one of {REDUCERS}")
        self.reduce = reduce
        # Held only until start() copies them into shared memory: dropping them before the workers
        # fork keeps 47 MB of image bytes from being counted again in every worker.
        self._splits: tuple[Split, Split] | None = (train, test or Split(b"", b""))
        self.train_count, self.test_count, self.pixels = train.count, test.count if test else 0, train.pixels
        self.size = parameter_count(sizes)
        self.context = mp.get_context(start_method)
        self.pool = WorkerPool(self.context, sizes, workers, reduce, self.pixels)

    def start(self) -> None:
        train, test = self._splits
        self._splits = None
        blobs = [train.images, train.labels, test.images, test.labels]
        del train, test
        try:
            self.pool.start(blobs)
        except BaseException:
            self.pool.close(graceful=False)
            raise

    def close(self, graceful: bool = True) -> None:
        self.pool.close(graceful)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.pool.procs]

    def nodes(self) -> int:
        return 1

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self.pool.params[:] = array("d", params)

    def _run(self, messages: list, kind: str) -> dict[int, tuple]:
        """Send each worker its message (None: nothing to do); collect the replies, watching for
        deaths and for workers that stop answering (the watchdog's limit for this kind of work)."""
        pending, sent = self._dispatch(messages)
        faults.point("dispatch" if kind == "grad" else "evaluate")
        with self.tracer.span("wait"):
            replies = self._collect(pending, kind, sent)
        for k in sorted(replies):
            if replies[k][-1]:  # the worker's spans, on this machine's clock
                self.tracer.worker(k, f"worker {k}", replies[k][-1])
        return replies

    def _dispatch(self, messages: list) -> tuple[dict, float]:
        """({worker: its process sentinel} for each worker sent a message, when they were sent)."""
        pending, sent = {}, time.perf_counter()
        with self.serial, self.tracer.span("dispatch"):
            for k, message in enumerate(messages):
                if message is not None:
                    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)  # what conn.send() does, counted
                    try:
                        self.pool.conns[k].send_bytes(payload)
                    except OSError:
                        raise WorkerDied(f"worker {k} is gone")
                    pending[k] = self.pool.procs[k].sentinel
                    self.bytes_sent += len(payload)
        return pending, sent

    def _collect(self, pending: dict, kind: str, sent: float) -> dict[int, tuple]:
        """The replies of the `pending` workers, by worker; a stop request gives them STOP_GRACE."""
        conns, replies = self.pool.conns, {}
        deadline, stopping = sent + self.watchdog.limit(kind), False
        while pending:
            if not stopping and self.stop_requested():
                # Ctrl-C stops within seconds: the step in flight gets STOP_GRACE to finish
                stopping, deadline = True, min(deadline, time.perf_counter() + STOP_GRACE)
            ready = set(wait([conns[k] for k in pending] + list(pending.values()),
                             min(POLL, max(0.0, deadline - time.perf_counter()))))
            if not ready:
                if time.perf_counter() < deadline:
                    continue
                if stopping:
                    for k in pending:
                        self.pool.procs[k].kill()  # a worker that cannot answer is ended with the run
                    raise StopRequested(f"stopped while worker {', '.join(map(str, sorted(pending)))} had not answered")
                raise self._unresponsive(sorted(pending), deadline - sent)
            for k in list(pending):
                if conns[k] in ready:
                    replies[k] = self._reply(k)
                    del pending[k]
                    self.watchdog.answered(kind, time.perf_counter() - sent)
                elif pending[k] in ready:
                    raise self._death(k)
            if kind == "grad" and len(replies) == 1:
                faults.point("wait")
        return replies

    def _reply(self, k: int) -> tuple:
        try:
            payload = self.pool.conns[k].recv_bytes()
        except (EOFError, OSError):  # its end of the pipe closed: it died
            raise self._death(k)
        self.bytes_received += len(payload)
        reply = pickle.loads(payload)
        if reply[0] == "error":
            raise WorkerError(k, reply[1])
        return reply

    def _unresponsive(self, silent: list[int], waited: float) -> WorkerDied:
        """Workers that did not answer in time are as good as dead (stopped, deadlocked, swapped
        out): kill them now (SIGKILL reaches a stopped process too), and let the step be redone."""
        procs = self.pool.procs
        for k in silent:
            procs[k].kill()
        names = ", ".join(f"{k} (pid {procs[k].pid})" for k in silent)
        return WorkerDied(f"worker {names} did not answer within {waited:.0f} s (--worker-timeout); killed it")

    def _death(self, k: int) -> WorkerDied:
        proc = self.pool.procs[k]
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
                self.restarts += 1
                self.pool.restart()
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
                total = floats(self.pool.reduced)
            else:
                total = reduce_sums([self.pool.slots[k] for k in done])
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
