"""The parent's side of a step: its messages to the worker processes, its own share of the work,
and the replies, collected while it watches for deaths, silence and stop requests.

A step's messages travel one of two ways, each a class of its own here: `Piped`, one message per
worker on its own pipe and the answer back on it; or `Posted`, one message for all posted in the
shared mailbox and rung on the bell, the answers in the mailbox's rows (mailbox.py; with the
workers adding up, untraced). `Exchange` runs a round the same way over either.

The trainer is participant 0 of every step: with W workers it computes one shard itself and W - 1
worker processes compute the others, so W workers are W processes on W cores, not W + 1. It
computes its share after sending the others theirs, and waits at a barrier of the workers'
reduction the way it waits for replies: watching every worker's sentinel and the watchdog's limit.
"""

from __future__ import annotations

import time
from typing import Callable

from parallel_nn import faults
from parallel_nn.capabilities import readable
from parallel_nn.parallel.base import StopRequested, WorkerDied
from parallel_nn.parallel.local.mailbox import ERROR, ROW
from parallel_nn.parallel.trace import Recorder

POLL = 0.25  # seconds between looks at the stop flag while waiting for the workers
STOP_GRACE = 2.0  # seconds the step in flight may take to finish once a stop is requested


class Piped:
    """Each worker's message on its own pipe; its answer back on the same pipe."""

    mine = False  # the trainer computes the shard its message names

    def __init__(self, exchange: "Exchange"):
        self.exchange = exchange

    def send(self, messages: list) -> dict:
        """{worker: its process sentinel} for each worker process sent a message."""
        x = self.exchange
        pending, conns, sentinels = {}, x.engine.pool.conns, x.engine.pool.sentinels
        for k, message in enumerate(messages):
            if k and message is not None:
                try:
                    conns[k].send_bytes(message)
                except OSError:
                    raise WorkerDied(f"worker {k} is gone")
                pending[k] = sentinels[k]
                x.engine.bytes_sent += len(message)
        return pending

    def own(self, messages: list) -> bytes | None:
        return messages[0]

    def answered(self) -> bool:
        return bool(self.exchange.replies)

    def sources(self) -> list:
        x = self.exchange
        return [x.engine.pool.conns[k] for k in x.pending if k not in x.replies]

    def take(self, ready: set) -> None:
        x = self.exchange
        for k in x.pending:
            if k not in x.replies and x.engine.pool.conns[k] in ready:
                x.replies[k], size = x.engine.pool.reply(k)
                x.engine.bytes_received += size

    def silent(self, pending: list) -> list:
        return pending


class Posted:
    """One message for every worker, posted in the shared mailbox and rung on the bell; the answers
    in the mailbox's rows, each counted on the bell (a failure's traceback comes on the pipe)."""

    mine = True  # the trainer computes its own part of the one message, as each worker does

    def __init__(self, exchange: "Exchange"):
        self.exchange = exchange
        self.posted = 0  # messages posted: each answer row carries the number it answers
        self.answers = 0  # answers to the message in flight, counted so far

    def send(self, message: bytes) -> dict:
        pool = self.exchange.engine.pool
        self.posted += 1
        self.answers = 0
        pool.mailbox.post(self.posted, message)
        pool.bell.ring(len(pool.sentinels))
        self.exchange.engine.bytes_sent += len(message)
        return dict(pool.sentinels)

    def own(self, message: bytes) -> bytes:
        return message

    def answered(self) -> bool:
        return bool(self.answers)

    def sources(self) -> list:
        return [self.exchange.engine.pool.bell.done]

    def take(self, ready: set) -> None:
        x = self.exchange
        pool = x.engine.pool
        if pool.bell.done not in ready:
            return
        got = pool.bell.answered(len(x.pending) - self.answers)
        if ERROR in got:
            rows = pool.mailbox.answers()
            failed = [k for k in x.pending if rows[k][:2] == (self.posted, ERROR)]
            pool.reply(failed[0])  # its traceback came on its pipe: raises WorkerError
        self.answers += len(got)
        if self.answers == len(x.pending):
            rows = pool.mailbox.answers()
            x.engine.bytes_received += len(x.pending) * ROW.size
            x.replies = {k: ("ok", rows[k][2], rows[k][3], []) for k in x.pending}

    def silent(self, pending: list) -> list:
        rows = self.exchange.engine.pool.mailbox.answers()
        return [k for k in pending if rows[k][0] != self.posted]


class Exchange:
    """One round of messages and replies between the parent and its workers (pool.LocalEngine's:
    its pool, and its tracer, watchdog, stop flag and counters as the trainer set them)."""

    def __init__(self, engine):
        self.engine = engine
        self.piped, self.posted = Piped(self), Posted(self)
        self.transport: Piped | Posted = self.piped
        self.pending: dict[int, object] = {}  # worker -> its process sentinel, for the workers sent this round's work
        self.replies: dict[int, tuple] = {}  # the replies read so far

    def run(self, messages, work: str, meanwhile: Callable[[], None] | None = None) -> dict[int, tuple]:
        """Send the workers their messages (a list, one per participant, the first the trainer's own,
        None for nothing to do: piped; or bytes, one message for all: posted), compute the trainer's
        share, run `meanwhile`, and collect every reply, by participant."""
        self.transport = self.posted if isinstance(messages, bytes) else self.piped
        self.sent = time.perf_counter()
        self.deadline, self.stopping = self.sent + self.engine.watchdog.limit(work), False
        self.replies = {}
        if work != "grad":  # before the work goes out: a signal to the group here always finds it undone
            faults.point("evaluate")
        self.pending = self._send(messages)
        if work == "grad":
            faults.point("dispatch")
        own = self._own(self.transport.own(messages))
        if meanwhile is not None:
            meanwhile()
        with self.engine.tracer.span("wait"):
            replies = self._collect(work)
        if own is not None:
            replies[0] = own
        for k in sorted(replies):
            if replies[k][-1]:  # the participant's spans, on this machine's clock
                self.engine.tracer.worker(k, f"worker {k}", replies[k][-1])
        return replies

    def _send(self, messages) -> dict:
        with self.engine.serial, self.engine.tracer.span("dispatch"):
            return self.transport.send(messages)

    def _own(self, message: bytes | None) -> tuple | None:
        """The trainer's share, computed here (worker 0 of the trace)."""
        if message is None:
            return None
        rec = Recorder(self.engine.tracer.active)
        return ("ok", *self.engine.pool.local.run(message, rec, mine=self.transport.mine), rec.spans)

    def gather(self, barrier) -> None:
        """The trainer at a barrier of the workers' reduction (party 0): every pending worker's
        arrival, then their release. A death, a worker's error or the watchdog's limit ends the
        wait as they end the wait for replies."""
        need = len(self.pending)
        while need:
            ready = self._ready([barrier.arrive, *self.transport.sources()])
            if barrier.arrive in ready:
                need -= barrier.arrivals(need)
            self._take(ready)  # only a failure can answer before the barrier: it raises
        barrier.release()

    def _collect(self, work: str) -> dict[int, tuple]:
        """The replies of the pending workers, by worker."""
        first = False
        while len(self.replies) < len(self.pending):
            self._take(self._ready(self.transport.sources()))
            if work == "grad" and not first and self.transport.answered():
                first = True
                faults.point("wait")  # the first answers are in, the others still computing
        self.engine.watchdog.answered(work, time.perf_counter() - self.sent)
        replies, self.pending = self.replies, {}
        return replies

    def _take(self, ready: set) -> None:
        """Read the answers that `ready` says have come (a failure raises WorkerError), then raise
        WorkerDied for a pending worker that died without answering."""
        self.transport.take(ready)
        for k, sentinel in self.pending.items():
            if k not in self.replies and sentinel in ready:
                raise self.engine.pool.death(k)

    def _ready(self, sources: list) -> set:
        """What is ready among `sources` and the pending workers' sentinels, after waiting at most
        POLL. A stop request gives the step in flight STOP_GRACE to finish; past the deadline with
        nothing ready, the silent workers are dealt with (_late)."""
        if not self.stopping and self.engine.stop_requested():
            self.stopping, self.deadline = True, min(self.deadline, time.perf_counter() + STOP_GRACE)
        left = max(0.0, self.deadline - time.perf_counter())
        sentinels = [s for k, s in self.pending.items() if k not in self.replies]
        ready = set(readable(sources + sentinels, min(POLL, left)))
        if not ready and time.perf_counter() >= self.deadline:
            raise self._late()
        return ready

    def _late(self) -> Exception:
        """Workers that did not answer in time: killed, and the step redone (or, stopping, given up)."""
        pending = self.transport.silent(sorted(k for k in self.pending if k not in self.replies))
        if self.stopping:
            for k in pending:
                self.engine.pool.procs[k].kill()  # a worker that cannot answer is ended with the run
            return StopRequested(f"stopped while worker {', '.join(map(str, pending))} had not answered")
        return self.engine.pool.silenced(pending, self.deadline - self.sent)
