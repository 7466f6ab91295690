"""The local backend's worker process: attach the shared segments, then answer the parent's messages.

A worker is started by pool.LocalEngine (see there for who creates and closes what). It computes
with shards.shard_gradient and shards.shard_predictions, the same functions a Ray actor runs.
"""

from __future__ import annotations

import os
import signal
import traceback
from array import array

import psutil

from parallel_nn import faults
from parallel_nn.capabilities import TERMINAL_SIGNALS, readable, unblock
from parallel_nn.data.mnist import AUGMENT_BYTES
from parallel_nn.kernels import floats
from parallel_nn.kernels.lanes import Lanes, combine, magnitudes
from parallel_nn.kernels.tensor import LEVELS, lanes_for
from parallel_nn.nn.network import parameter_count
from parallel_nn.nn.optim import STATE_VECTORS, Optimizer
from parallel_nn.parallel.local.mailbox import EVAL, OK, ERROR, STEP, STOP, Mailbox, decode, encode_error, encode_reply
from parallel_nn.parallel.local.modes import MODES
from parallel_nn.parallel.shards import reduce_sums, shard, shard_gradient, shard_predictions, unpack_indices
from parallel_nn.parallel.trace import Recorder

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
    except (OSError, AttributeError, ImportError, TypeError):  # no prctl, no SIGKILL, no C library by that name
        pass


def process_alive(pid: int, started: float) -> bool:
    """Whether process `pid`, started at `started` (psutil's create_time: not a later process given
    the same pid), still runs; a zombie has ended."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_main(conn, spec: dict, rank: int, barrier=None, bell=None, lanes_barriers=None) -> None:
    # Ctrl-C at a terminal, or its closing (SIGHUP), goes to the whole process group; only the
    # parent decides what it means (save, stop the workers). A worker that died of it would look
    # like a crash.
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    unblock(TERMINAL_SIGNALS)  # blocked by the parent while starting us, where signals can be blocked
    # A forked worker inherits the trainer's SIGTERM handler (which only sets a flag); terminate()
    # must end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The process that started us: the trainer (fork, spawn) or the forkserver, which exits with
    # the trainer. If it goes, we are re-parented, and leave rather than linger as an orphan.
    # Waiting at a barrier, whose party 0 is the trainer, we also check the trainer itself: under
    # forkserver a dead trainer's forkserver lives on while we (holding its pipe) wait for ever.
    parent_pid = os.getppid()
    die_with_parent()
    segments = {key: handle.attach() for key, handle in spec["segments"].items()}
    shared = SharedViews(segments, spec, rank)
    try:
        alive = lambda: os.getppid() == parent_pid and process_alive(*spec["trainer"])  # noqa: E731
        work = Participant(shared, spec, rank, barrier, alive, lanes_barriers)
        serve(conn, bell, work)
    except (EOFError, OSError):
        return  # the parent closed the pipe
    finally:
        shared.close()
        for segment in segments.values():
            segment.close()


def serve(conn, bell, work: "Participant") -> None:
    """Answer the parent's messages until it sends STOP or goes away. A message comes one of two
    ways: on this worker's own pipe, or posted in the shared mailbox for every worker and rung on
    the bell (mailbox.py; Windows has no bell: there only the parent adds up)."""
    sources = [conn] + ([bell.go] if bell is not None else [])
    while True:
        ready = readable(sources, 1.0)
        if not ready:
            if not work.parent_alive():
                return
            continue
        if bell is not None and bell.go in ready and bell.take():
            answer_posted(conn, bell, work)
        if conn in ready and not answer_piped(conn, work):
            return


def answer_posted(conn, bell, work: "Participant") -> None:
    """The message posted in the mailbox: the answer goes in this worker's row of it, and on the bell."""
    number, message = work.shared.mailbox.read()
    try:
        loss, correct = work.run(message, Recorder(False), mine=True)
        work.shared.mailbox.answer(work.rank, number, OK, loss, correct)
        bell.answer(OK)
    except Exception:
        # The parent waits on the bell, not on this pipe: the ERROR first, then the traceback,
        # which it reads from the pipe once it sees ERROR (a long one would fill the pipe).
        work.shared.mailbox.answer(work.rank, number, ERROR)
        bell.answer(ERROR)
        conn.send_bytes(encode_error(traceback.format_exc()))


def answer_piped(conn, work: "Participant") -> bool:
    """The message on this worker's pipe, answered on it; False for STOP."""
    message = conn.recv_bytes()
    if message == STOP:
        return False
    try:
        rec = Recorder(decode(message)[2])
        conn.send_bytes(encode_reply(*work.run(message, rec), rec.spans))
    except Exception:
        conn.send_bytes(encode_error(traceback.format_exc()))
    return True


class SharedViews:
    """Participant `rank`'s views of the shared segments (see pool.py): a worker's, attached once
    when it starts, or the trainer's own (participant 0), on the segments it made. `close()`
    releases the views; the segments are their owner's to close.

    `params[b]` is weights buffer b (one, or two with reduce="sharded"), as raw float64 bytes;
    `my_params[b]` and `my_state[b][j]` are this worker's slice of weights buffer b and of state
    vector j in state buffer b (reduce="sharded").
    """

    def __init__(self, segments: dict, spec: dict, rank: int):
        self.segments = segments
        size, workers, mode = parameter_count(spec["sizes"]), spec["workers"], MODES[spec["reduce"]]
        self.size = size
        buffers = mode.buffers
        weights = self.segments["params"].buf  # raw float64 bytes: floats() reads them in bulk
        self.params = [weights[8 * b * size : 8 * (b + 1) * size] for b in range(buffers)]
        self.slot = slot_views(self.segments["slots"].buf, size, workers)[rank].cast("d")  # its gradient slot
        self.reduced = self.segments["reduced"].buf.cast("d") if mode.reduced else None
        # this worker's slice of the reduction (the same contiguous split as the shards), in every slot
        bounds = shard(range(size), workers)[rank]
        self.start, self.stop = (bounds[0], bounds[-1] + 1) if bounds else (0, 0)
        self.parts = slot_views(self.segments["slots"].buf, size, workers, self.start, self.stop) if mode.workers_add else []
        self.my_params = [weights[8 * (b * size + self.start) : 8 * (b * size + self.stop)] for b in range(buffers)]
        self.my_state = [[self.segments["state"].buf[8 * ((b * STATE_SLOTS + j) * size + self.start) :
                                                     8 * ((b * STATE_SLOTS + j) * size + self.stop)]
                          for j in range(STATE_SLOTS)] for b in range(buffers)] if mode.workers_update else []
        self.mailbox = Mailbox(self.segments["mailbox"].buf, workers) if mode.workers_add else None
        self.lanes = self.segments["lanes"].buf if "lanes" in self.segments else None
        self.data = self.segments["data"].buf
        self.splits = [self.data[a : a + n] for a, n in spec["layout"]]  # train images, labels, test images, labels

    def close(self) -> None:
        views = [*self.params, self.slot, *self.parts, self.reduced, *self.my_params, *sum(self.my_state, []), self.data,
                 *self.splits, self.mailbox and self.mailbox.buf, self.lanes]
        for view in views:
            if view is not None:
                view.release()


STATE_SLOTS = max(len(v) for v in STATE_VECTORS.values())  # per-parameter state vectors kept per buffer


class Participant:
    """What a participant computes: its shard's gradient sum into its slot (and, reducing, its slice
    of the sum over every slot; sharded, its slice of the update too), or its test examples'
    predictions. Participant 0 is the trainer itself (`in_trainer`): it runs the same code, but the
    fault points meant for worker processes are not its own."""

    def __init__(self, shared: SharedViews, spec: dict, rank: int, barrier, parent_alive, lanes_barriers=None,
                 in_trainer: bool = False):
        self.shared, self.sizes, self.pixels, self.workers = shared, spec["sizes"], spec["pixels"], spec["workers"]
        self.rank, self.barrier, self.parent_alive = rank, barrier, parent_alive
        self.lanes_barriers = lanes_barriers  # (scan, pack): CPython's participants share the packing of the lanes
        self.point = (lambda phase: None) if in_trainer else faults.point

    def run(self, message: bytes, rec: Recorder, mine: bool = False) -> tuple:
        """What `message` asks (mailbox.decode): (loss, correct) of a step, or (loss, predictions) of
        an evaluation. `mine`: the message is the whole batch's (a broadcast); take my shard of it."""
        kind, current, _, update, (a, b) = decode(message)
        if kind == EVAL:
            self.point("worker evaluate")
            with rec.span("evaluate"):
                return self.predictions(a, b, current)
        if mine:
            a, b = my_part(a, b, self.workers, self.rank)
        loss, correct = self.gradient(a, b, current, rec)
        if kind == STEP:
            self.update(current, *update, rec)
        return loss, correct

    def gradient(self, packed: bytes, augment, current: int, rec: Recorder) -> tuple[float, int]:
        shared = self.shared
        train_images, train_labels = shared.splits[:2]
        self.point("compute")
        with rec.span("read weights"):
            weights = floats(shared.params[current])
        lanes = self.share_lanes(weights, rec) if self.lanes_barriers is not None else None
        flat, loss, correct = shard_gradient(weights, self.sizes, train_images, train_labels, unpack_indices(packed),
                                             self.pixels, augment, rec, lanes)
        with rec.span("write slot"):
            shared.slot[:] = flat
        if self.barrier is not None:
            with rec.span("barrier"):
                self.barrier.wait(self.rank, self.parent_alive)  # every slot is written
        if shared.reduced is not None:
            with rec.span("reduce slice"):
                shared.reduced[shared.start:shared.stop] = array("d", reduce_sums(shared.parts))
        return loss, correct

    def share_lanes(self, weights, rec: Recorder) -> tuple | None:
        """The first layer's weights packed into lanes (CPython's kernels, tensor.sparse_linear) by
        all the workers together, each doing its share of the input columns: it finds its columns'
        largest magnitude in each row and posts them to the `lanes` segment; past a first barrier,
        every worker combines the posts into the layout (lanes.combine: what one scan of every
        column gives); each packs its columns into the segment; past a second barrier, every worker
        reads them all. The same ints as one worker packing them all (integers are exact), for 1/W
        of the scanning and packing. None where W cannot be packed: every worker combines the same
        posts, so all of them skip the second barrier alike."""
        inputs, outputs = self.sizes[0], self.sizes[1]
        scan, pack = self.lanes_barriers
        posts = lanes_bytes(self.sizes, 0)  # where the magnitudes go, after the packed columns
        with rec.span("pack lanes"):
            piece = shard(range(inputs), self.workers)[self.rank]
            start, stop = (piece[0], piece[-1] + 1) if piece else (0, 0)
            part = [weights[j * inputs + start : j * inputs + stop] for j in range(outputs)]
            mine = posts + 8 * self.rank * outputs
            self.shared.lanes[mine : mine + 8 * outputs] = array("d", magnitudes(part)).tobytes()
        with rec.span("barrier"):
            scan.wait(self.rank, self.parent_alive)  # every worker's magnitudes are posted
        with rec.span("pack lanes"):
            posted = array("d", bytes(self.shared.lanes[posts : posts + 8 * self.workers * outputs]))
            layout = lanes_for(combine(posted[k * outputs : (k + 1) * outputs] for k in range(self.workers)), inputs)
            if layout is None:
                return None
            size = layout.count * layout.width
            self.shared.lanes[start * size : stop * size] = layout.to_bytes(layout.pack_columns(part))
        with rec.span("barrier"):
            pack.wait(self.rank, self.parent_alive)  # every share is packed
        with rec.span("pack lanes"):
            return layout, layout.from_bytes(bytes(self.shared.lanes[: inputs * size]))

    def update(self, current: int, lr: float, scale: float, t: int, settings: tuple, rec: Recorder) -> None:
        """My slice of weights buffer `current`, updated with my slice of the summed gradient, into
        the other buffer (and my slice of the optimizer's state likewise): the same arithmetic as
        the parent's update, element by element, so the same bits. Buffer `current` is left as it
        was, so a step that fails anywhere can be redone from it."""
        shared = self.shared
        with rec.span("reduce slice"):
            grad = reduce_sums(shared.parts)
        with rec.span("update slice"):
            name, momentum, weight_decay = settings
            optimizer = Optimizer(name, 0, momentum=momentum, weight_decay=weight_decay)
            optimizer.state = {"t": t, **{key: floats(shared.my_state[current][j])
                                          for j, key in enumerate(STATE_VECTORS[name])}}
            new = optimizer.step(floats(shared.my_params[current]), grad, lr, scale)
            shared.my_params[1 - current].cast("d")[:] = array("d", new)
            self.point("worker update")  # half written: the step must be redone from buffer `current`
            for j, key in enumerate(STATE_VECTORS[name]):
                shared.my_state[1 - current][j].cast("d")[:] = array("d", optimizer.state[key])

    def predictions(self, start: int, stop: int, current: int) -> tuple[float, list[int]]:
        test_images, test_labels = self.shared.splits[2:]
        return shard_predictions(floats(self.shared.params[current]), self.sizes, test_images, test_labels, start, stop,
                                 self.pixels)


def my_part(packed: bytes, augment, workers: int, k: int) -> tuple:
    """Worker k's shard of a whole batch's packed indices and augmentation: the same contiguous
    split as shards.batch_messages gives the per-worker messages."""
    piece = shard(range(len(packed) // 4), workers)[k]
    start, stop = (piece[0], piece[-1] + 1) if piece else (0, 0)
    part = None if augment is None else augment[AUGMENT_BYTES * start : AUGMENT_BYTES * stop]
    return packed[4 * start : 4 * stop], part


def lanes_bytes(sizes, workers: int) -> int:
    """The `lanes` segment's size: every input column of the first layer, packed, then each worker's
    magnitudes of its columns, one float per row (Participant.share_lanes)."""
    layout = Lanes([1.0] * sizes[1], LEVELS * sizes[0], LEVELS)
    return sizes[0] * layout.count * layout.width + 8 * workers * sizes[1]
