"""How the parent tells the workers what to do, and how they answer.

A message is a fixed header packed with `struct`, then the step's packed example indices and
augmentation bytes: packed by hand rather than pickled, since pickling a tuple costs PyPy about
90 us a message (1.5 ms a step at 16 workers, all on the parent's serial path) and this ~2 us.
A worker's answer on its pipe is packed the same way (`encode_reply`): its loss and count, or its
predictions as one byte each; pickled, a step's answer cost the trainer ~0.2 ms to read on PyPy,
on the step's critical path (a traced step's spans are the only thing still pickled).

Each worker has its own pipe (multiprocessing.Pipe) for messages meant for it alone: its shard of
a step, its share of an evaluation, STOP. With a workers' reduction (--reduce workers or sharded)
an untraced step goes out as a broadcast instead: the parent writes the whole batch's message
once into the `Mailbox` (a shared segment) and rings the `Bell` (one write of one byte per worker
into one pipe, which wakes them all); each worker takes one byte, reads the message, computes its
own shard (the same contiguous split as the per-worker messages), writes its loss and count into
its row of the mailbox and puts one byte into the bell's answer pipe. The parent's work per step
then no longer grows with the number of workers: one copy, one write, and a read of the answers.

The broadcast is safe only with a workers' reduction: its barrier keeps a fast worker from coming
back for a second byte before every worker has taken its own (each has, to reach the barrier).
"""

from __future__ import annotations

import os
import pickle
import struct
from multiprocessing import reduction

from parallel_nn.nn.optim import OPTIMIZERS
from parallel_nn.parallel.local.barrier import close_all

#   kind (GRAD, STEP, EVAL), weights buffer, traced, optimizer (index in OPTIMIZERS),
#   lr, scale, momentum, weight decay, step count t, then for GRAD/STEP: bytes of indices, bytes of
#   augmentation (NO_AUGMENT: none); for EVAL: start, stop of the test examples.
HEADER = struct.Struct("<BBBBddddqII")
GRAD, STEP, EVAL = range(3)
NO_AUGMENT = 0xFFFFFFFF
STOP = b""  # the parent's last message: leave
OK, ERROR = 0, 1
#   a worker's answer on its pipe: status (OK, ERROR), loss, correct (PREDICTIONS: an evaluation's
#   predicted classes follow, one byte each), bytes of pickled trace spans (which come first);
#   after ERROR, the traceback's text
REPLY = struct.Struct("<Bdqi")
PREDICTIONS = -1


def encode(kind: int, current: int, traced: bool, a: int, b: int, payload: bytes = b"", lr: float = 0.0,
           scale: float = 0.0, t: int = 0, settings: tuple = ("sgd", 0.0, 0.0)) -> bytes:
    name, momentum, weight_decay = settings
    return HEADER.pack(kind, current, traced, OPTIMIZERS.index(name), lr, scale, momentum, weight_decay, t, a, b) + payload


def encode_batch(kind: int, current: int, traced: bool, packed: bytes, augment: bytes | None, **update) -> bytes:
    """A step's message: `packed` example indices (int32) and their augmentation bytes, or None."""
    return encode(kind, current, traced, len(packed), NO_AUGMENT if augment is None else len(augment),
                  packed + (augment or b""), **update)


def decode(message) -> tuple:
    """(kind, weights buffer, traced, (lr, scale, t, settings), (indices, augment) or (start, stop))."""
    kind, current, traced, opt, lr, scale, momentum, weight_decay, t, a, b = HEADER.unpack_from(message)
    update = (lr, scale, t, (OPTIMIZERS[opt], momentum, weight_decay))
    if kind == EVAL:
        return kind, current, bool(traced), update, (a, b)
    body = memoryview(message)[HEADER.size :]
    augment = None if b == NO_AUGMENT else bytes(body[a : a + b])
    return kind, current, bool(traced), update, (bytes(body[:a]), augment)


ROW = struct.Struct("<QBdq")  # a worker's answer: step number, OK or ERROR, summed loss, number correct
POST = struct.Struct("<QI")  # the message's step number and length


def encode_reply(loss: float, result: int | list[int], spans: list) -> bytes:
    """A worker's answer: (loss, correct) of a step or (loss, predicted classes) of an evaluation,
    and its trace spans (none unless traced)."""
    traced = pickle.dumps(spans) if spans else b""
    if isinstance(result, int):
        return REPLY.pack(OK, loss, result, len(traced)) + traced
    return REPLY.pack(OK, loss, PREDICTIONS, len(traced)) + traced + bytes(result)


def encode_error(text: str) -> bytes:
    return REPLY.pack(ERROR, 0.0, 0, 0) + text.encode("utf-8", "replace")


def decode_reply(payload: bytes) -> tuple:
    """("ok", loss, correct or predictions, spans) or ("error", traceback)."""
    status, loss, result, traced = REPLY.unpack_from(payload)
    body = memoryview(payload)[REPLY.size :]
    if status == ERROR:
        return "error", bytes(body).decode("utf-8", "replace")
    spans = pickle.loads(body[:traced]) if traced else []
    return "ok", loss, list(body[traced:]) if result == PREDICTIONS else result, spans


class Mailbox:
    """The broadcast's shared segment: the step's message, then one answer row per worker."""

    def __init__(self, buf: memoryview, workers: int):
        self.buf, self.workers = buf, workers
        self.rows = len(buf) - workers * ROW.size  # where the answers start

    @staticmethod
    def size(workers: int, max_examples: int, augment_bytes: int) -> int:
        return POST.size + HEADER.size + max_examples * (4 + augment_bytes) + workers * ROW.size

    def fits(self, message: bytes) -> bool:
        return POST.size + len(message) <= self.rows

    def post(self, number: int, message: bytes) -> None:
        POST.pack_into(self.buf, 0, number, len(message))
        self.buf[POST.size : POST.size + len(message)] = message

    def read(self) -> tuple[int, bytes]:
        number, length = POST.unpack_from(self.buf, 0)
        return number, bytes(self.buf[POST.size : POST.size + length])

    def answer(self, k: int, number: int, status: int, loss: float = 0.0, correct: int = 0) -> None:
        ROW.pack_into(self.buf, self.rows + k * ROW.size, number, status, loss, correct)

    def answers(self) -> list[tuple]:
        """(step number, status, loss, correct) per worker."""
        return [ROW.unpack_from(self.buf, self.rows + k * ROW.size) for k in range(self.workers)]


class Bell:
    """Two anonymous pipes: `ring` wakes every worker at once, `answered` carries one byte back per
    worker (OK or ERROR). Nothing named, nothing to leak; a fresh one per generation of workers."""

    def __init__(self, fds: tuple[int, int, int, int] | None = None):
        if fds is None:
            go, done = os.pipe(), os.pipe()
            fds = (*go, *done)
            os.set_blocking(fds[0], False)  # a woken worker may find the bytes taken: it waits again
            os.set_blocking(fds[2], False)
        self.fds = fds
        self.go, self.done = fds[0], fds[2]  # what the workers and the parent wait on

    def __reduce__(self):
        # pickled only while spawn or forkserver start a worker: the descriptors are passed to it
        return _rebuild, tuple(reduction.DupFd(fd) for fd in self.fds)

    def ring(self, workers: int) -> None:
        os.write(self.fds[1], bytes(workers))

    def take(self) -> bool:
        """A worker's: take one wake-up byte; False if another worker was faster."""
        try:
            return len(os.read(self.go, 1)) == 1
        except BlockingIOError:
            return False

    def answer(self, status: int) -> None:
        os.write(self.fds[3], bytes([status]))

    def answered(self, most: int) -> bytes:
        """The parent's: the answers that have arrived (at most `most` bytes; b"" if none)."""
        try:
            return os.read(self.done, most)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.fds = close_all(self.fds)


def _rebuild(*dups) -> Bell:
    return Bell(tuple(dup.detach() for dup in dups))
