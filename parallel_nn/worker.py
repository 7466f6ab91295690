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
    segments = {key: handle.attach() for key, handle in spec["segments"].items()}
    sizes, pixels = spec["sizes"], spec["pixels"]
    size = parameter_count(sizes)
    params = segments["params"].buf  # raw float64 bytes: floats() reads them in bulk
    my_slot = slot_views(segments["slots"].buf, size, spec["workers"])[slot].cast("d")
    reduced = segments["reduced"].buf.cast("d") if barrier is not None else None
    # this worker's slice of the reduction (the same contiguous split as the shards), in every slot
    bounds = shard(range(size), spec["workers"])[slot]
    my_start, my_stop = (bounds[0], bounds[-1] + 1) if bounds else (0, 0)
    my_parts = slot_views(segments["slots"].buf, size, spec["workers"], my_start, my_stop) if barrier is not None else []
    data = segments["data"].buf
    train_images, train_labels, test_images, test_labels = (data[a : a + n] for a, n in spec["layout"])
    views = [v for v in (params, my_slot, *my_parts, reduced, data, train_images, train_labels, test_images, test_labels)
             if v is not None]
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
                rec = Recorder(message[-1])
                if message[0] == "grad":
                    _, packed, augment, _ = message
                    faults.point("compute")
                    with rec.span("read weights"):
                        weights = floats(params)
                    flat, loss, correct = shard_gradient(weights, sizes, train_images, train_labels, unpack_indices(packed),
                                                         pixels, augment, rec)
                    with rec.span("write slot"):
                        my_slot[:] = flat
                    if barrier is not None:
                        with rec.span("barrier"):
                            barrier.wait(slot, lambda: os.getppid() == parent_pid)  # every slot is written
                        with rec.span("reduce slice"):
                            reduced[my_start:my_stop] = array("d", reduce_sums(my_parts))
                    conn.send(("ok", loss, correct, rec.spans))
                else:
                    _, start, stop, _ = message
                    faults.point("worker evaluate")
                    with rec.span("evaluate"):
                        result = shard_predictions(floats(params), sizes, test_images, test_labels, start, stop, pixels)
                    conn.send(("ok", *result, rec.spans))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, OSError):
        return  # the parent closed the pipe
    finally:
        for view in views:
            view.release()
        for segment in segments.values():
            segment.close()
