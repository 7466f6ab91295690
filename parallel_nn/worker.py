"""The local backend's worker process: attach the shared segments, then answer the parent's messages.

A worker is started by local.LocalEngine (see there for who creates and closes what). It computes
with engine.shard_gradient and engine.shard_predictions, the same functions a Ray actor runs.
"""

from __future__ import annotations

import os
import signal
import traceback
from array import array

from . import faults
from .engine import reduce_sums, shard, shard_gradient, shard_predictions, unpack_indices
from .kernels import floats
from .network import parameter_count
from .trace import Recorder

PARENTS_SIGNALS = {signal.SIGINT, signal.SIGHUP}
PR_SET_PDEATHSIG = 1  # linux/prctl.h  # sent to the whole group, meant for the trainer alone


def slot_views(buf: memoryview, size: int, workers: int, start: int = 0, stop: int | None = None) -> list[memoryview]:
    """Per worker k, the raw bytes of float64 elements start..stop of its slot in the `slots` segment.

    Made once, and sliced as bytes: under PyPy a slice of a view cast to "d" is read element by
    element (~10x slower than a byte slice). Writers and readers cast as they need.
    """
    stop = size if stop is None else stop
    return [buf[8 * (k * size + start) : 8 * (k * size + stop)] for k in range(workers)]


def die_with_parent() -> None:
    """Where the kernel offers it (Linux's PR_SET_PDEATHSIG), have it SIGKILL this worker the moment
    the process that started it dies: even a stopped worker, which could never notice, then goes.
    Elsewhere the worker's own check of its parent (every second) remains."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError, ImportError):
        pass


def worker_main(conn, spec: dict, slot: int, barrier=None) -> None:
    # Ctrl-C at a terminal, or its closing (SIGHUP), goes to the whole process group; only the
    # parent decides what it means (save, stop the workers). A worker that died of it would look
    # like a crash.
    for sig in PARENTS_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENTS_SIGNALS)  # blocked by the parent while starting us
    # A forked worker inherits the trainer's SIGTERM handler (which only sets a flag); terminate()
    # must end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The process that started us: the trainer (fork, spawn) or the forkserver, which exits with
    # the trainer. If it goes, we are re-parented, and leave rather than linger as an orphan.
    parent_pid = os.getppid()
    die_with_parent()
    shared = Shared(spec, slot, barrier is not None)
    try:
        serve(conn, Shard(shared, spec, slot, barrier, lambda: os.getppid() == parent_pid))
    except (EOFError, OSError):
        return  # the parent closed the pipe
    finally:
        shared.close()


def serve(conn, work: "Shard") -> None:
    """Answer the parent's messages until it sends None or goes away."""
    while True:
        if not conn.poll(1.0):
            if not work.parent_alive():
                return
            continue
        message = conn.recv()
        if message is None:
            return
        try:
            rec = Recorder(message[-1])
            if message[0] == "grad":
                loss, correct = work.gradient(message[1], message[2], rec)
                conn.send(("ok", loss, correct, rec.spans))
            else:
                faults.point("worker evaluate")
                with rec.span("evaluate"):
                    result = work.predictions(message[1], message[2])
                conn.send(("ok", *result, rec.spans))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Shared:
    """This worker's views of the shared segments (see local.py), attached once, released at the end."""

    def __init__(self, spec: dict, slot: int, reducing: bool):
        self.segments = {key: handle.attach() for key, handle in spec["segments"].items()}
        size, workers = parameter_count(spec["sizes"]), spec["workers"]
        self.params = self.segments["params"].buf  # raw float64 bytes: floats() reads them in bulk
        self.slot = slot_views(self.segments["slots"].buf, size, workers)[slot].cast("d")
        self.reduced = self.segments["reduced"].buf.cast("d") if reducing else None
        # this worker's slice of the reduction (the same contiguous split as the shards), in every slot
        bounds = shard(range(size), workers)[slot]
        self.start, self.stop = (bounds[0], bounds[-1] + 1) if bounds else (0, 0)
        self.parts = slot_views(self.segments["slots"].buf, size, workers, self.start, self.stop) if reducing else []
        self.data = self.segments["data"].buf
        self.splits = [self.data[a : a + n] for a, n in spec["layout"]]  # train images, labels, test images, labels

    def close(self) -> None:
        for view in (self.params, self.slot, *self.parts, self.reduced, self.data, *self.splits):
            if view is not None:
                view.release()
        for segment in self.segments.values():
            segment.close()


class Shard:
    """What a worker computes: its shard's gradient sum into its slot (and, reducing, its slice of
    the sum over every slot), or its test examples' predictions."""

    def __init__(self, shared: Shared, spec: dict, slot: int, barrier, parent_alive):
        self.shared, self.sizes, self.pixels = shared, spec["sizes"], spec["pixels"]
        self.slot, self.barrier, self.parent_alive = slot, barrier, parent_alive

    def gradient(self, packed: bytes, augment, rec: Recorder) -> tuple[float, int]:
        shared = self.shared
        train_images, train_labels = shared.splits[:2]
        faults.point("compute")
        with rec.span("read weights"):
            weights = floats(shared.params)
        flat, loss, correct = shard_gradient(weights, self.sizes, train_images, train_labels, unpack_indices(packed),
                                             self.pixels, augment, rec)
        with rec.span("write slot"):
            shared.slot[:] = flat
        if self.barrier is not None:
            with rec.span("barrier"):
                self.barrier.wait(self.slot, self.parent_alive)  # every slot is written
            with rec.span("reduce slice"):
                shared.reduced[shared.start:shared.stop] = array("d", reduce_sums(shared.parts))
        return loss, correct

    def predictions(self, start: int, stop: int) -> tuple[float, list[int]]:
        test_images, test_labels = self.shared.splits[2:]
        return shard_predictions(floats(self.shared.params), self.sizes, test_images, test_labels, start, stop,
                                 self.pixels)
