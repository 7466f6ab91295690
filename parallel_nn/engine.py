"""What every backend shares: the worker's computation, the sharding, the reduction in shard order.

An engine runs one data-parallel step: `gradient(indices, augment)` returns the *sum* over the batch
of the per-example gradients (flat), the summed loss and the number correct; `evaluate()` runs
the test set. Two engines implement `Engine`: local.py (worker processes on shared memory, the
default) and ray_backend.py (Ray actors, possibly on many machines); backends.py, a floor above
them, chooses one. This module knows neither. Both shard the batch with `shard`, have
every worker run `shard_gradient`, and add the shard sums with `reduce_sums` in shard order, so
the same `--workers` gives bit-identical weights on either backend.
"""

from __future__ import annotations

import sys
import time
from array import array
from typing import Callable, Optional, Sequence

from . import UserError
from .kernels import KIND, add_into, doubles, floats
from .mnist import AUGMENT_BYTES, decode_batch
from .network import backward, forward, predict, unflatten
from .trace import NoTracer, Recorder

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


class Watchdog:
    """How long the parent waits for a worker's answer before it treats the worker as dead.

    A stopped (SIGSTOP), deadlocked or swapped-out worker never answers, and waiting for it would
    hang the run for ever. The limit is either fixed (`--worker-timeout`) or scaled from what was
    measured: `factor` times the slowest answer seen so far for the same kind of work (a step and
    an evaluation differ a hundredfold), never below `floor` (the first step includes the JIT's
    warm-up and, under spawn, the workers' imports).
    """

    def __init__(self, fixed: Optional[float] = None, floor: float = 60.0, factor: float = 20.0):
        self.fixed, self.floor, self.factor = fixed, floor, factor
        self.slowest: dict[str, float] = {}

    def limit(self, kind: str) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(self.floor, self.factor * self.slowest.get(kind, 0.0))

    def answered(self, kind: str, seconds: float) -> None:
        self.slowest[kind] = max(seconds, self.slowest.get(kind, 0.0))


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

    def __exit__(self, kind, value, tb) -> None:
        # On Ctrl-C or an error the workers' current work is worthless: stop them at once.
        self.close(graceful=kind is None)

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


def shard(indices: Sequence[int], workers: int) -> list[list[int]]:
    """Contiguous pieces whose sizes differ by at most one (500 over 8: four of 63, four of 62)."""
    n, extra = divmod(len(indices), workers)
    pieces, start = [], 0
    for k in range(workers):
        size = n + (k < extra)
        pieces.append(list(indices[start : start + size]))
        start += size
    return pieces


def reduce_sums(parts: Sequence) -> Sequence[float]:
    """total[p] = sum_k parts[k][p], adding the float64 buffers `parts` in the order given.

    Every reduction of shard sums goes through here (the local parent, the local workers' reduce-
    scatter, the Ray driver), so all of them add in the same order and agree to the bit. On
    CPython one C-level pass (zip walks the parts side by side); under the JIT a plain loop.
    """
    if not parts:
        return []
    if KIND == "loops":
        total = floats(parts[0])  # a fresh copy, summed into in place
        for part in parts[1:]:
            add_into(total, floats(part))
        return total
    return list(map(sum, zip(*map(doubles, parts))))


def shard_gradient(params: Sequence[float], sizes: Sequence[int], images, labels, indices: Sequence[int],
                   pixels: int, augment: Optional[bytes] = None, rec: Optional[Recorder] = None,
                   packed=None) -> tuple[array, float, int]:
    """The worker's computation: (flat sum of the shard's per-example gradients, summed loss, correct).

    `images` and `labels` are the raw training bytes (or views of them); nothing else is needed,
    which is what lets a local process and a remote actor run the same function. `rec` records
    the decode, forward and backward spans for --trace. `packed`: the first layer's lanes, packed
    by the workers together (worker.Shard.share_lanes), or None to pack them here.
    """
    rec = rec or Recorder(False)
    flat = array("d")
    if not indices:  # an empty shard contributes zeros (and still takes part in a reduction)
        flat.frombytes(bytes(8 * len(params)))
        return flat, 0.0, 0
    layers = unflatten(params, sizes)
    with rec.span("decode"):
        X = decode_batch(images, indices, pixels, augment)
        X.rows  # decoded here, not lazily inside the forward pass
    with rec.span("forward"):
        Zs, As = forward(layers, X, packed)
    with rec.span("backward"):
        grads, loss, correct = backward(layers, Zs, As, [labels[k] for k in indices])
        for dW, db in grads:
            for row in dW:
                flat.extend(row)
            flat.extend(db)
    return flat, loss, correct


def shard_predictions(params: Sequence[float], sizes: Sequence[int], images, labels, start: int, stop: int,
                      pixels: int) -> tuple[float, list[int]]:
    """(summed loss, predicted classes) of test examples start..stop-1, a chunk at a time."""
    layers = unflatten(params, sizes)
    loss, predictions = 0.0, []
    for a in range(start, stop, EVAL_CHUNK):
        chunk = range(a, min(stop, a + EVAL_CHUNK))
        part_loss, part = predict(layers, decode_batch(images, chunk, pixels), [labels[k] for k in chunk])
        loss += part_loss
        predictions.extend(part)
    return loss, predictions


def pack_indices(indices: Sequence[int]) -> bytes:
    """Example indices as int32 bytes: what travels to a worker each step (pickling a list of ints
    costs ~0.25 ms a message on PyPy; bytes pickle as one copy)."""
    return array("i", indices).tobytes()


def unpack_indices(data: bytes) -> list[int]:
    values = array("i")
    values.frombytes(data)
    return values.tolist()


def batch_messages(indices: Sequence[int], augment: Optional[bytes], workers: int, everyone: bool = False) -> list:
    """Per worker: (its packed indices, its augmentation bytes) or None when it has nothing
    to do (`everyone`: every worker gets a message, empty shards included)."""
    messages, start, a = [], 0, AUGMENT_BYTES
    for piece in shard(indices, workers):
        part = None if augment is None else augment[a * start : a * (start + len(piece))]
        messages.append((pack_indices(piece), part) if piece or everyone else None)
        start += len(piece)
    return messages


def eval_ranges(count: int, workers: int) -> list:
    """Per worker: (start, stop) of its test examples, or None."""
    return [(p[0], p[-1] + 1) if p else None for p in shard(range(count), workers)]
