"""The data-parallel engine: worker processes computing shard gradients on shared-memory weights.

Lifetimes, written down where they happen:
- The parent creates three shared-memory segments in `start()` and is the only process that
  unlinks them, in `close()`: `params` (the flat float64 weights, written by the parent after each
  update), `slots` (one float64 gradient slot per worker, written only by its worker) and `data`
  (the raw uint8 train and test sets, written once before any worker starts).
- Workers attach by name once, when they start, whatever the start method, and never write
  `params` or `data`. They exit when the parent sends None, when their pipe closes, or when they
  notice their parent is gone (so a killed trainer leaves no orphans).
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
import os
import signal
import sys
import time
import traceback
from array import array
from multiprocessing import shared_memory
from multiprocessing.connection import wait
from typing import Callable, Sequence

from . import UserError
from .mnist import Split, decode_batch
from .network import loss_and_gradient, parameter_count, predict, unflatten

START_METHODS = ("fork", "spawn", "forkserver")
REDUCERS = ("parent", "workers")
MAX_RESTARTS = 3  # attempts at one step before a worker that keeps dying ends the run
EVAL_CHUNK = 1000  # test images a worker decodes at a time: bounds its memory


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


class WorkerDied(Exception):
    """A worker process exited (killed, out of memory) before answering."""


class WorkerCrashed(UserError):
    """Workers kept dying: the run stops (the trainer saves a resumable checkpoint first)."""


def shard(indices: Sequence[int], workers: int) -> list[list[int]]:
    """Contiguous pieces whose sizes differ by at most one (500 over 8: four of 63, four of 62)."""
    n, extra = divmod(len(indices), workers)
    pieces, start = [], 0
    for k in range(workers):
        size = n + (k < extra)
        pieces.append(list(indices[start : start + size]))
        start += size
    return pieces


class Engine:
    """`with Engine(...) as engine:` — gradient() and evaluate() run on `workers` processes."""

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
        self.serial = SerialTimer()  # the trainer adds its update to it too
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._procs: list = []
        self._conns: list = []

    # ---- lifetime ----

    def __enter__(self) -> "Engine":
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
            self._segments["params"] = shared_memory.SharedMemory(create=True, size=8 * self.size)
            self._segments["slots"] = shared_memory.SharedMemory(create=True, size=8 * self.size * self.workers)
            if self.reduce == "workers":
                self._segments["reduced"] = shared_memory.SharedMemory(create=True, size=8 * self.size)
            self._segments["data"] = shared_memory.SharedMemory(create=True, size=max(1, offset))
            data = self._segments["data"].buf
            for (start, length), blob in zip(self._layout, blobs):
                data[start : start + length] = blob
            del data, blobs
            # The parent never reads the data again: unmapping its copy leaves those pages charged
            # only to the workers that touch them. The segment itself lives until close() unlinks it.
            self._segments["data"].close()
            self._params = self._segments["params"].buf.cast("d")
            self._slots = self._segments["slots"].buf.cast("d")
            if self.reduce == "workers":
                self._reduced = self._segments["reduced"].buf.cast("d")
            self._spawn()
        except BaseException:
            self.close(graceful=False)
            raise

    def _spawn(self) -> None:
        spec = {
            "names": {key: seg.name for key, seg in self._segments.items()},
            "sizes": self.sizes,
            "layout": self._layout,
            "pixels": self.pixels,
            "workers": self.workers,
        }
        # A fresh barrier per generation of workers: one broken by a death is never reused. The
        # engine keeps it referenced: under spawn, a collected barrier unlinks its semaphores
        # before the children have opened them.
        barrier = self._barrier = self.context.Barrier(self.workers) if self.reduce == "workers" else None
        for k in range(self.workers):
            parent_end, child_end = self.context.Pipe()
            proc = self.context.Process(target=_worker_main, args=(child_end, spec, k, barrier),
                                        name=f"parallel_nn-worker-{k}", daemon=True)
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)

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

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, then (only the parent ever does this) unlink the shared memory."""
        self._stop_workers(graceful)
        for view in ("_params", "_slots", "_reduced"):
            if hasattr(self, view):
                getattr(self, view).release()
                delattr(self, view)
        for segment in self._segments.values():
            segment.close()  # a second close() is a no-op
            segment.unlink()
        self._segments = {}

    def _restart(self) -> None:
        self.restarts += 1
        self._stop_workers(graceful=False)
        self._spawn()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self._params[:] = array("d", params)

    def _run(self, messages: list) -> dict[int, tuple]:
        """Send each worker its message (None: nothing to do); collect the replies, watching for deaths."""
        pending = {}
        with self.serial:
            for k, message in enumerate(messages):
                if message is not None:
                    try:
                        self._conns[k].send(message)
                    except OSError:
                        raise WorkerDied(f"worker {k} is gone")
                    pending[k] = self._procs[k].sentinel
        replies = {}
        while pending:
            ready = set(wait([self._conns[k] for k in pending] + list(pending.values())))
            for k in list(pending):
                conn = self._conns[k]
                if conn in ready:
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):  # its end of the pipe closed: it died
                        raise self._death(k)
                    if reply[0] == "error":
                        raise RuntimeError(f"worker {k} failed:\n{reply[1]}")
                    replies[k] = reply
                    del pending[k]
                elif pending[k] in ready:
                    raise self._death(k)
        return replies

    def _death(self, k: int) -> WorkerDied:
        proc = self._procs[k]
        proc.join(1.0)  # the pipe and the sentinel signal a death before its exit status is collected
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"worker {k} (pid {proc.pid}) died: {how}")

    def _run_recovering(self, messages: list) -> dict[int, tuple]:
        for attempt in range(MAX_RESTARTS + 1):
            try:
                return self._run(messages)
            except WorkerDied as e:
                if attempt == MAX_RESTARTS:
                    raise WorkerCrashed(f"{e}; gave up after {MAX_RESTARTS} restarts") from e
                self.warn(f"{e}; restarting the workers and redoing the step")
                self._restart()
        raise AssertionError("unreachable")

    def gradient(self, indices: Sequence[int], shifts: bytes | None = None) -> tuple[list[float], float, int]:
        """(sum over `indices` of the per-example gradients, flat; summed loss; number correct).

        `shifts`: optional augmentation, two bytes per example (mnist.decode_batch).
        """
        shards = shard(indices, self.workers)
        messages, start = [], 0
        for piece in shards:
            part = None if shifts is None else shifts[2 * start : 2 * (start + len(piece))]
            # Every worker takes part in a workers' reduction (an empty shard contributes zeros).
            messages.append(("grad", piece, part) if piece or self.reduce == "workers" else None)
            start += len(piece)
        replies = self._run_recovering(messages)
        with self.serial:
            size, done = self.size, sorted(replies)  # a fixed order: reproducible for a given worker count
            if self.reduce == "workers":
                total = self._reduced.tolist()
            else:  # total[p] = sum_k slot_k[p], one C-level pass: zip walks the slots' memory side by side
                total = reduce_slots(self._slots, size, done)
            loss = sum(replies[k][1] for k in done)
            correct = sum(replies[k][2] for k in done)
        return total, loss, correct

    def evaluate(self, params: Sequence[float] | None = None) -> tuple[float, list[int]]:
        """(summed test loss, predicted class per test image), the test set split across the workers."""
        if params is not None:
            self.set_params(params)
        pieces = shard(range(self.test_count), self.workers)
        replies = self._run_recovering([("eval", p[0], p[-1] + 1) if p else None for p in pieces])
        loss, predictions = 0.0, []
        for k in sorted(replies):
            loss += replies[k][1]
            predictions.extend(replies[k][2])
        return loss, predictions


def reduce_slots(slots: memoryview, size: int, which: Sequence[int], start: int = 0, stop: int | None = None) -> list[float]:
    """[sum_k slots[k][p] for p in start..stop], k in `which` order: the parent and the workers
    reduce with this one function, so both modes add in the same order and agree to the bit."""
    stop = size if stop is None else stop
    return list(map(sum, zip(*[slots[k * size + start : k * size + stop] for k in which])))


# ---- the worker side ----


def _worker_main(conn, spec: dict, slot: int, barrier=None) -> None:
    # Ctrl-C at a terminal goes to the whole process group; only the parent decides what it means
    # (save, stop the workers). A worker that died of it would look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the trainer's SIGTERM handler (which only sets a flag); terminate()
    # must end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The process that started us: the trainer (fork, spawn) or the forkserver, which exits with
    # the trainer. If it goes, we are re-parented, and leave rather than linger as an orphan.
    parent_pid = os.getppid()
    segments = {key: shared_memory.SharedMemory(name=name) for key, name in spec["names"].items()}
    sizes, pixels = spec["sizes"], spec["pixels"]
    size = parameter_count(sizes)
    params = segments["params"].buf.cast("d")
    slots = segments["slots"].buf.cast("d")
    my_slot = slots[slot * size : (slot + 1) * size]
    reduced = segments["reduced"].buf.cast("d") if barrier is not None else None
    # this worker's slice of the reduction (the same contiguous split as the shards)
    bounds = shard(range(size), spec["workers"])[slot]
    my_start, my_stop = (bounds[0], bounds[-1] + 1) if bounds else (0, 0)
    data = segments["data"].buf
    train_images, train_labels, test_images, test_labels = (data[a : a + n] for a, n in spec["layout"])
    views = [v for v in (params, my_slot, slots, reduced, data, train_images, train_labels, test_images, test_labels) if v is not None]
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            message = conn.recv()
            if message is None:
                return
            try:
                if message[0] == "grad":
                    _, indices, shifts = message
                    if indices:
                        layers = unflatten(params.tolist(), sizes)
                        grads, loss, correct = loss_and_gradient(
                            layers, decode_batch(train_images, indices, pixels, shifts), [train_labels[k] for k in indices])
                        flat = array("d")
                        for dW, db in grads:
                            for row in dW:
                                flat.extend(row)
                            flat.extend(db)
                    else:
                        flat, loss, correct = array("d", bytes(8 * size)), 0.0, 0
                    my_slot[:] = flat
                    if barrier is not None:
                        barrier.wait()  # every slot is written: reduce this worker's slice of them
                        reduced[my_start:my_stop] = array("d", reduce_slots(slots, size, range(spec["workers"]), my_start, my_stop))
                    conn.send(("ok", loss, correct))
                else:
                    _, start, stop = message
                    layers = unflatten(params.tolist(), sizes)
                    loss, predictions = 0.0, []
                    for a in range(start, stop, EVAL_CHUNK):
                        chunk = range(a, min(stop, a + EVAL_CHUNK))
                        part_loss, part = predict(layers, decode_batch(test_images, chunk, pixels),
                                                  [test_labels[k] for k in chunk])
                        loss += part_loss
                        predictions.extend(part)
                    conn.send(("ok", loss, predictions))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, OSError):
        return  # the parent closed the pipe
    finally:
        for view in views:
            view.release()
        for segment in segments.values():
            segment.close()
