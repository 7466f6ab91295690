"""The local backend: the trainer and worker processes computing shard gradients on shared-memory weights.

With W workers, W processes compute: the trainer itself is worker 0 (exchange.py), and W - 1
worker processes are workers 1 .. W - 1; with one worker the trainer computes alone.

Lifetimes, written down where they happen:
- The parent creates three anonymous shared-memory segments (shm.py) in `start()`: `params` (the
  flat float64 weights, written by the parent after each update), `slots` (one float64 gradient
  slot per worker, written only by its worker) and `data` (the raw uint8 train and test sets,
  written once before any worker starts). They have no name in /dev/shm: each is freed when the
  last process holding it exits, so no way of dying can leak one. The parent keeps them mapped
  (it computes on them too) and keeps their descriptors until `close()`, to hand them to
  restarted workers.
- Workers (worker.py) attach once, when they start, from descriptors passed to them (whatever
  the start method), and never write `params` or `data`. They exit when the parent sends None,
  when their pipe closes, or when they notice their parent is gone (so a killed trainer leaves no
  orphans).
- Per step the parent sends each worker only the indices of its examples (a few hundred bytes);
  weights are never pickled.
- With the workers adding up the slots (--reduce workers or sharded, modes.py) there are more
  segments: `reduced` (their sum), the optimizer's `state`, the `mailbox` a step is broadcast on.
  The sums are taken in the same order as the parent's, so every mode gives the same bits.

Workers are plain Processes with one Pipe each rather than a multiprocessing.Pool: Pool waits
forever for a task whose worker was killed (cpython#96062), while `connection.wait` on the pipes
*and* the process sentinels sees a death at once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from array import array
from typing import Callable, Sequence

import psutil

from parallel_nn import faults
from parallel_nn.capabilities import SELECT_PIPES, SIGHUP, TERMINAL_SIGNALS, signals_blocked
from parallel_nn.data.mnist import AUGMENT_BYTES, Split
from parallel_nn.kernels import KIND, floats
from parallel_nn.nn.network import parameter_count
from parallel_nn.nn.optim import STATE_VECTORS
from parallel_nn.parallel.base import Engine, StopRequested, WorkerCrashed, WorkerDied, WorkerError
from parallel_nn.parallel.local.barrier import PipeBarrier
from parallel_nn.parallel.local.exchange import Exchange
from parallel_nn.parallel.local.mailbox import EVAL, GRAD, STEP, STOP, Bell, Mailbox, decode_reply, encode, encode_batch
from parallel_nn.parallel.local.modes import MODES
from parallel_nn.parallel.local.shm import Segment
from parallel_nn.parallel.local.worker import STATE_SLOTS, Participant, SharedViews, lanes_bytes, slot_views, worker_main
from parallel_nn.parallel.shards import batch_messages, eval_ranges, pack_indices, reduce_sums

ALL_REDUCERS = tuple(MODES)  # --reduce (modes.py)
REDUCERS = ALL_REDUCERS if SELECT_PIPES else ("parent",)  # capabilities.py
MAX_RESTARTS = 3  # attempts at one step before a worker that keeps dying ends the run


class AsTrainer:
    """A barrier as its party 0, the trainer, waits at it: through `gather` (Exchange.gather), which
    watches the workers meanwhile."""

    def __init__(self, barrier: PipeBarrier, gather: Callable[[PipeBarrier], None]):
        self.barrier, self.gather = barrier, gather

    def wait(self, party: int, alive: Callable[[], bool]) -> None:
        self.gather(self.barrier)


class WorkerPool:
    """The shared segments, the trainer's own share of the work and the worker processes: made,
    restarted and stopped.

    After `start`, `weights[b]` is weights buffer b's float64 view (one buffer, or two with
    reduce="sharded": the step reads one and the workers write the other), `state[b][j]` optimizer
    state vector j of buffer b (sharded only), `slots[k]` worker k's gradient slot (raw bytes),
    `reduced` the reduce-scatter's result (reduce="workers" only), `local` worker 0's computation
    (worker.Participant, run in the trainer), and `conns[k]`, `procs[k]` and `sentinels[k]` worker
    process k's pipe, process and sentinel, for k = 1 .. workers - 1.
    """

    def __init__(self, context, sizes: Sequence[int], workers: int, reduce: str, pixels: int,
                 gather: Callable[[PipeBarrier], None]):
        self.context, self.sizes, self.workers, self.pixels = context, list(sizes), workers, pixels
        self.mode = MODES[reduce]
        self.gather = gather
        self.size = parameter_count(sizes)
        self.segments: dict[str, Segment] = {}
        self.procs: dict[int, object] = {}
        self.conns: dict[int, object] = {}
        self.sentinels: dict[int, int] = {}
        self.shared: SharedViews | None = None
        self.barrier: PipeBarrier | None = None
        self.bell: Bell | None = None
        self.lanes_barriers: tuple[PipeBarrier, PipeBarrier] | None = None
        # CPython's kernels pack the first layer's weights into lanes every step: with a workers'
        # reduction (a barrier already) the workers split that packing and share it (worker.py)
        self.shares_lanes = KIND == "idioms" and self.mode.workers_add

    def start(self, blobs: list) -> None:
        """Copy `blobs` (train images, labels, test images, labels) into shared memory; start the workers."""
        self.layout, offset = [], 0
        for blob in blobs:
            self.layout.append((offset, len(blob)))
            offset += len(blob)
        self.segments["params"] = Segment(8 * self.size * self.mode.buffers)
        self.segments["slots"] = Segment(8 * self.size * self.workers)
        if self.mode.reduced:
            self.segments["reduced"] = Segment(8 * self.size)
        if self.mode.workers_update:
            self.segments["state"] = Segment(8 * self.size * self.mode.buffers * STATE_SLOTS)
        if self.mode.workers_add:
            self.segments["mailbox"] = Segment(Mailbox.size(self.workers, self.layout[1][1], AUGMENT_BYTES))
        if self.shares_lanes:
            self.segments["lanes"] = Segment(lanes_bytes(self.sizes, self.workers))
        self.segments["data"] = Segment(offset)
        data = self.segments["data"].buf
        for (start, length), blob in zip(self.layout, blobs):
            data[start : start + length] = blob
        del data, blobs
        self.weights = slot_views(self.segments["params"].buf, self.size, self.mode.buffers)
        self.weights = [view.cast("d") for view in self.weights]
        self.slots = slot_views(self.segments["slots"].buf, self.size, self.workers)
        if self.mode.reduced:
            self.reduced = self.segments["reduced"].buf.cast("d")
        if self.mode.workers_add:
            self.mailbox = Mailbox(self.segments["mailbox"].buf, self.workers)
        if self.mode.workers_update:
            vectors = slot_views(self.segments["state"].buf, self.size, self.mode.buffers * STATE_SLOTS)
            self.state = [[v.cast("d") for v in vectors[b * STATE_SLOTS : (b + 1) * STATE_SLOTS]] for b in range(self.mode.buffers)]
        self.spec = {
            "segments": {key: seg.handle() for key, seg in self.segments.items()},
            "sizes": self.sizes,
            "layout": self.layout,
            "pixels": self.pixels,
            "workers": self.workers,
            "reduce": self.mode.name,
            "trainer": (os.getpid(), psutil.Process().create_time()),  # party 0 of the workers' barriers
        }
        self.shared = SharedViews(self.segments, self.spec, 0)  # worker 0's views: the trainer's own
        self.spawn()

    def spawn(self) -> None:
        spec = self.spec
        # A fresh barrier per generation of workers: one broken by a death is never reused. Pipes,
        # not multiprocessing's named semaphores, which SIGKILL to the group would leave in /dev/shm.
        self.barrier = PipeBarrier(self.workers) if self.mode.workers_add else None
        self.bell = Bell() if self.mode.workers_add else None
        self.lanes_barriers = (PipeBarrier(self.workers), PipeBarrier(self.workers)) if self.shares_lanes else None
        as_trainer = [None if b is None else AsTrainer(b, self.gather) for b in (self.barrier, *(self.lanes_barriers or ()))]
        self.local = Participant(self.shared, spec, 0, as_trainer[0], lambda: True,
                           tuple(as_trainer[1:]) if self.lanes_barriers else None, in_trainer=True)
        if self.workers > 1:
            self._start_helpers()
        # Workers start with the terminal's signals blocked (a signal mask survives fork and exec),
        # so a Ctrl-C or a closed terminal while a spawned worker is still importing cannot kill it
        # or print a traceback; the worker ignores them, then unblocks them. A signal meant for the
        # trainer meanwhile stays pending and is delivered when the mask is restored here. (No
        # signal mask on Windows: there the worker ignores them from its first line on.)
        with signals_blocked(TERMINAL_SIGNALS):
            for k in range(1, self.workers):
                parent_end, child_end = self.context.Pipe()
                proc = self.context.Process(target=worker_main, args=(child_end, spec, k, self.barrier, self.bell, self.lanes_barriers),
                                            name=f"parallel_nn-worker-{k}", daemon=True)
                proc.start()
                child_end.close()
                self.procs[k] = proc
                self.conns[k] = parent_end
                self.sentinels[k] = proc.sentinel

    def _start_helpers(self) -> None:
        """The forkserver or resource tracker that the start method needs, started now with SIGHUP
        blocked: they do not ignore it themselves, and a closed terminal must not kill them under
        the trainer. (Starting the resource tracker unblocks SIGINT and SIGTERM in the caller when
        it is done, which would undo a mask set before it for the workers; it ignores those two.)
        Windows' spawn needs no tracker, and has none to start."""
        method = self.context.get_start_method()
        with signals_blocked({SIGHUP}):
            if method == "forkserver":
                from multiprocessing import forkserver

                forkserver.ensure_running()  # starts the resource tracker too
            elif method == "spawn":
                try:
                    from multiprocessing import resource_tracker

                    resource_tracker.ensure_running()
                except (ImportError, AttributeError):
                    pass

    def stop(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns.values():
                try:
                    conn.send_bytes(STOP)
                except OSError:
                    pass
        deadline = time.monotonic() + (5.0 if graceful else 0.0)
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()  # its sentinel's descriptor now, not whenever the garbage collector runs
        for conn in self.conns.values():
            conn.close()
        self.procs, self.conns, self.sentinels = {}, {}, {}
        for link in (self.barrier, self.bell, *(self.lanes_barriers or ())):
            if link is not None:
                link.close()
        self.barrier = self.bell = self.lanes_barriers = None

    def restart(self) -> None:
        self.stop(graceful=False)
        self.spawn()

    def close(self, graceful: bool = True) -> None:
        """Stop the workers, then close the parent's descriptors: the memory goes with the last user."""
        self.stop(graceful)
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if hasattr(self, "mailbox"):
            self.mailbox.buf.release()
            del self.mailbox
        for name in ("weights", "slots", "reduced", "state"):
            if hasattr(self, name):
                views = getattr(self, name)
                for view in views if isinstance(views, list) else [views]:
                    for v in view if isinstance(view, list) else [view]:
                        v.release()
                delattr(self, name)
        for segment in self.segments.values():
            segment.close()  # a second close() is a no-op
        self.segments = {}


    def reply(self, k: int) -> tuple[tuple, int]:
        """Worker k's reply on its pipe, and its size; a WorkerError if it failed, WorkerDied if it is gone."""
        try:
            payload = self.conns[k].recv_bytes()
        except (EOFError, OSError):  # its end of the pipe closed: it died
            raise self.death(k)
        reply = decode_reply(payload)
        if reply[0] == "error":
            raise WorkerError(k, reply[1])
        return reply, len(payload)

    def silenced(self, silent: list[int], waited: float) -> WorkerDied:
        """Workers that did not answer in time are as good as dead (stopped, deadlocked, swapped
        out): kill them now (SIGKILL reaches a stopped process too), and let the step be redone."""
        for k in silent:
            self.procs[k].kill()
        names = ", ".join(f"{k} (pid {self.procs[k].pid})" for k in silent)
        return WorkerDied(f"worker {names} did not answer within {waited:.0f} s (--worker-timeout); killed it")

    def death(self, k: int) -> WorkerDied:
        proc = self.procs[k]
        proc.join(1.0)  # the pipe and the sentinel signal a death before its exit status is collected
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"worker {k} (pid {proc.pid}) died: {how}")


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
        self.current = 0  # the weights buffer that holds the weights now (reduce="sharded" flips it each step)
        self.exchange = Exchange(self)
        self.pool = WorkerPool(self.context, sizes, workers, reduce, self.pixels, self.exchange.gather)

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
        """The worker processes' (workers 1 .. W - 1; worker 0 is this process)."""
        return [p.pid for p in self.pool.procs.values()]

    def nodes(self) -> int:
        return 1

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self.pool.weights[self.current][:] = array("d", params)

    def _run_recovering(self, messages, work: str, meanwhile: Callable[[], None] | None = None) -> dict[int, tuple]:
        for attempt in range(MAX_RESTARTS + 1):
            try:
                return self.exchange.run(messages, work, meanwhile if attempt == 0 else None)
            except WorkerDied as e:
                if self.stop_requested():  # stopping: the group's SIGTERM or SIGHUP reached the workers too
                    raise StopRequested(str(e)) from e
                if attempt == MAX_RESTARTS:
                    raise WorkerCrashed(f"{e}; gave up after {MAX_RESTARTS} restarts") from e
                self.warn(f"{e}; restarting the workers and redoing the step")
                self.restarts += 1
                self.pool.restart()
        raise AssertionError("unreachable")

    def gradient(self, indices: Sequence[int], augment: bytes | None = None,
                 meanwhile: Callable[[], None] | None = None) -> tuple[list[float], float, int]:
        """(sum over `indices` of the per-example gradients, flat; summed loss; number correct).

        `augment`: optional augmentation, mnist.AUGMENT_BYTES per example (mnist.decode_batch).
        `meanwhile`: work for the parent while the workers compute (called once).
        """
        replies = self._run_recovering(self._messages(GRAD, indices, augment), "grad", meanwhile)
        faults.point("reduce")
        with self.serial, self.tracer.span("reduce"):
            done = sorted(replies)  # a fixed order: reproducible for a given worker count
            if self.pool.mode.reduced:
                total = floats(self.pool.reduced)
            else:
                total = reduce_sums([self.pool.slots[k] for k in done])
            loss = sum(replies[k][1] for k in done)
            correct = sum(replies[k][2] for k in done)
        return total, loss, correct

    def _messages(self, kind: int, indices: Sequence[int], augment: bytes | None, **update):
        """The step's messages: with a workers' reduction and no trace, one for everyone (the
        mailbox's broadcast); otherwise one per worker (None: nothing to do). Every worker takes
        part in a workers' reduction (an empty shard contributes zeros)."""
        traced = self.tracer.active
        with self.serial:
            if self.pool.bell is not None and not traced:
                message = encode_batch(kind, self.current, False, pack_indices(indices), augment, **update)
                if self.pool.mailbox.fits(message):  # a batch larger than the training set (the API allows it) does not
                    return message
            return [None if m is None else encode_batch(kind, self.current, traced, *m, **update)
                    for m in batch_messages(indices, augment, self.workers, everyone=self.pool.mode.workers_add)]

    # ---- reduce="sharded": the workers update their slices; the parent only says which step ----

    def step(self, indices: Sequence[int], augment: bytes | None, lr: float, scale: float, t: int, settings: tuple,
             meanwhile: Callable[[], None] | None = None) -> tuple[float, int]:
        """(summed loss, number correct) of a step whose update the workers apply, each to its own
        slice: optim.Optimizer(*settings) at step count `t`, learning rate `lr`, gradient scaled by
        `scale`. The new weights are in the other buffer until `commit()`: a step that fails, or
        diverges, leaves the weights as they were."""
        if not self.pool.mode.workers_update:
            raise ValueError("step() is the sharded reduction's; use gradient()")
        replies = self._run_recovering(self._messages(STEP, indices, augment, lr=lr, scale=scale, t=t, settings=settings),
                                       "grad", meanwhile)
        faults.point("reduce")
        with self.serial:
            done = sorted(replies)
            return sum(replies[k][1] for k in done), sum(replies[k][2] for k in done)

    def commit(self) -> None:
        """The step's new weights and optimizer state become the current ones."""
        self.current = 1 - self.current

    def weights(self) -> list[float]:
        return list(floats(self.pool.weights[self.current]))

    def set_state(self, name: str, state: dict) -> None:
        """Optimizer `name`'s per-parameter vectors (from optim.Optimizer.state_dict()), for the workers' updates."""
        for j, key in enumerate(STATE_VECTORS[name]):
            self.pool.state[self.current][j][:] = array("d", state[key])

    def state(self, name: str) -> dict:
        return {key: list(floats(self.pool.state[self.current][j])) for j, key in enumerate(STATE_VECTORS[name])}

    def evaluate(self, params: Sequence[float] | None = None) -> tuple[float, list[int]]:
        """(summed test loss, predicted class per test image), the test set split across the workers."""
        if params is not None:
            self.set_params(params)
        replies = self._run_recovering([None if r is None else encode(EVAL, self.current, self.tracer.active, *r)
                                        for r in eval_ranges(self.test_count, self.workers)], "eval")
        loss, predictions = 0.0, []
        for k in sorted(replies):
            loss += replies[k][1]
            predictions.extend(replies[k][2])
        return loss, predictions
