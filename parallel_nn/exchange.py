"""The parent's side of a step: its messages to the worker processes (each on its pipe, or broadcast
through the mailbox, mailbox.py), its own share of the work, and the replies, collected while it
watches for deaths, silence and stop requests.

The trainer is participant 0 of every step: with W workers it computes one shard itself and W - 1
worker processes compute the others, so W workers are W processes on W cores, not W + 1. It
computes its share after sending the others theirs, and waits at a barrier of the workers'
reduction the way it waits for replies: watching every worker's sentinel and the watchdog's limit.
"""

from __future__ import annotations

import time
from typing import Callable

from . import faults
from .capabilities import readable
from .engine import StopRequested, WorkerDied
from .mailbox import ERROR, ROW
from .trace import Recorder

POLL = 0.25  # seconds between looks at the stop flag while waiting for the workers
STOP_GRACE = 2.0  # seconds the step in flight may take to finish once a stop is requested


class Exchange:
    """One round of messages and replies between the parent and its workers (local.LocalEngine's:
    its pool, and its tracer, watchdog, stop flag and counters as the trainer set them)."""

    def __init__(self, engine):
        self.engine = engine
        self.posted = 0  # broadcasts posted to the mailbox: each answer row carries the number it answers
        self.pending: dict[int, object] = {}  # worker -> its process sentinel, for the workers sent this round's work

    def run(self, messages, kind: str, meanwhile: Callable[[], None] | None = None) -> dict[int, tuple]:
        """Send the workers their messages (a list, one per participant, the first the trainer's own,
        None for nothing to do; or bytes, one message for all, by the mailbox), compute the trainer's
        share, run `meanwhile`, and collect every reply, by participant."""
        self.broadcast = isinstance(messages, bytes)
        self.sent = time.perf_counter()
        self.deadline, self.stopping = self.sent + self.engine.watchdog.limit(kind), False
        self.replies, self.answers = {}, 0  # the replies read so far; the broadcast's answers counted so far
        if kind != "grad":  # before the work goes out: a signal to the group here always finds it undone
            faults.point("evaluate")
        self.pending = self._broadcast(messages) if self.broadcast else self._dispatch(messages)
        if kind == "grad":
            faults.point("dispatch")
        own = self._own(messages if self.broadcast else messages[0])
        if meanwhile is not None:
            meanwhile()
        with self.engine.tracer.span("wait"):
            replies = self._collect(kind)
        if own is not None:
            replies[0] = own
        for k in sorted(replies):
            if replies[k][-1]:  # the participant's spans, on this machine's clock
                self.engine.tracer.worker(k, f"worker {k}", replies[k][-1])
        return replies

    def _own(self, message: bytes | None) -> tuple | None:
        """The trainer's share, computed here (worker 0 of the trace)."""
        if message is None:
            return None
        rec = Recorder(self.engine.tracer.active)
        return ("ok", *self.engine.pool.local.run(message, rec, mine=self.broadcast), rec.spans)

    def _dispatch(self, messages: list) -> dict:
        """{worker: its process sentinel} for each worker process sent a message."""
        pending = {}
        conns, sentinels = self.engine.pool.conns, self.engine.pool.sentinels
        with self.engine.serial, self.engine.tracer.span("dispatch"):
            for k, message in enumerate(messages):
                if k and message is not None:
                    try:
                        conns[k].send_bytes(message)
                    except OSError:
                        raise WorkerDied(f"worker {k} is gone")
                    pending[k] = sentinels[k]
                    self.engine.bytes_sent += len(message)
        return pending

    def _broadcast(self, message: bytes) -> dict:
        self.posted += 1
        pool = self.engine.pool
        with self.engine.serial, self.engine.tracer.span("dispatch"):
            pool.mailbox.post(self.posted, message)
            pool.bell.ring(len(pool.sentinels))
        self.engine.bytes_sent += len(message)
        return dict(pool.sentinels)

    def gather(self, barrier) -> None:
        """The trainer at a barrier of the workers' reduction (party 0): every pending worker's
        arrival, then their release. A death, a worker's error or the watchdog's limit ends the
        wait as they end the wait for replies."""
        need = len(self.pending)
        while need:
            ready = self._ready([barrier.arrive, *self._answer_sources()])
            if barrier.arrive in ready:
                need -= barrier.arrivals(need)
            self._take_answers(ready)  # only a failure can answer before the barrier: it raises
        barrier.release()

    def _collect(self, kind: str) -> dict[int, tuple]:
        """The replies of the pending workers, by worker: from their pipes, or from the mailbox once
        every worker has answered the broadcast."""
        first = False
        while len(self.replies) < len(self.pending):
            self._take_answers(self._ready(self._answer_sources()))
            if kind == "grad" and not first and (self.replies or self.answers):
                first = True
                faults.point("wait")  # the first answers are in, the others still computing
        self.engine.watchdog.answered(kind, time.perf_counter() - self.sent)
        replies, self.pending = self.replies, {}
        return replies

    def _answer_sources(self) -> list:
        pool = self.engine.pool
        return [pool.bell.done] if self.broadcast else [pool.conns[k] for k in self.pending if k not in self.replies]

    def _take_answers(self, ready: set) -> None:
        """Read the answers that `ready` says have come (a failure raises WorkerError), then raise
        WorkerDied for a pending worker that died without answering."""
        pool = self.engine.pool
        if self.broadcast and pool.bell.done in ready:
            self.answers += self._answered(len(self.pending) - self.answers)
            if self.answers == len(self.pending):
                self.replies = self._answers()
        for k in self.pending:
            if not self.broadcast and k not in self.replies and pool.conns[k] in ready:
                self.replies[k], size = pool.reply(k)
                self.engine.bytes_received += size
        for k, sentinel in self.pending.items():
            if k not in self.replies and sentinel in ready:
                raise pool.death(k)

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

    def _answered(self, most: int) -> int:
        """How many answers to the broadcast came in; a worker's failure is raised at once."""
        got = self.engine.pool.bell.answered(most)
        if ERROR in got:
            rows = self.engine.pool.mailbox.answers()
            failed = [k for k in self.pending if rows[k][:2] == (self.posted, ERROR)]
            self.engine.pool.reply(failed[0])  # its traceback came on its pipe: raises WorkerError
        return len(got)

    def _answers(self) -> dict[int, tuple]:
        rows = self.engine.pool.mailbox.answers()
        self.engine.bytes_received += len(self.pending) * ROW.size
        return {k: ("ok", rows[k][2], rows[k][3], []) for k in self.pending}

    def _late(self) -> Exception:
        """Workers that did not answer in time: killed, and the step redone (or, stopping, given up)."""
        pending = sorted(k for k in self.pending if k not in self.replies)
        if self.broadcast:
            rows = self.engine.pool.mailbox.answers()
            pending = [k for k in pending if rows[k][0] != self.posted]
        if self.stopping:
            for k in pending:
                self.engine.pool.procs[k].kill()  # a worker that cannot answer is ended with the run
            return StopRequested(f"stopped while worker {', '.join(map(str, pending))} had not answered")
        return self.engine.pool.silenced(pending, self.deadline - self.sent)
