"""The parent's side of a step's messages: sent to each worker on its pipe, or broadcast through the
mailbox (mailbox.py); the replies collected while watching for deaths, silence and stop requests.
"""

from __future__ import annotations

import time
from multiprocessing.connection import wait
from typing import Callable

from . import faults
from .engine import StopRequested, WorkerDied
from .mailbox import ERROR, ROW

POLL = 0.25  # seconds between looks at the stop flag while waiting for the workers
STOP_GRACE = 2.0  # seconds the step in flight may take to finish once a stop is requested


class Exchange:
    """One round of messages and replies between the parent and its workers (local.LocalEngine's:
    its pool, and its tracer, watchdog, stop flag and counters as the trainer set them)."""

    def __init__(self, engine):
        self.engine = engine
        self.posted = 0  # broadcasts posted to the mailbox: each answer row carries the number it answers

    def run(self, messages, kind: str, meanwhile: Callable[[], None] | None = None) -> dict[int, tuple]:
        """Send the workers their messages (a list: one per worker, None for nothing to do; bytes: one
        message for all, by the mailbox), run `meanwhile` while they work, and collect the replies,
        watching for deaths and for workers that stop answering (the watchdog's limit for this kind
        of work)."""
        broadcast = isinstance(messages, bytes)
        pending, sent = self._broadcast(messages) if broadcast else self._dispatch(messages)
        faults.point("dispatch" if kind == "grad" else "evaluate")
        if meanwhile is not None:
            meanwhile()
        with self.engine.tracer.span("wait"):
            replies = self._collect(pending, kind, sent, broadcast)
        for k in sorted(replies):
            if replies[k][-1]:  # the worker's spans, on this machine's clock
                self.engine.tracer.worker(k, f"worker {k}", replies[k][-1])
        return replies

    def _dispatch(self, messages: list) -> tuple[dict, float]:
        """({worker: its process sentinel} for each worker sent a message, when they were sent)."""
        pending, sent = {}, time.perf_counter()
        conns, sentinels = self.engine.pool.conns, self.engine.pool.sentinels
        with self.engine.serial, self.engine.tracer.span("dispatch"):
            for k, message in enumerate(messages):
                if message is not None:
                    try:
                        conns[k].send_bytes(message)
                    except OSError:
                        raise WorkerDied(f"worker {k} is gone")
                    pending[k] = sentinels[k]
                    self.engine.bytes_sent += len(message)
        return pending, sent

    def _broadcast(self, message: bytes) -> tuple[dict, float]:
        self.posted += 1
        with self.engine.serial, self.engine.tracer.span("dispatch"):
            self.engine.pool.mailbox.post(self.posted, message)
            self.engine.pool.bell.ring(self.engine.workers)
        self.engine.bytes_sent += len(message)
        return dict(enumerate(self.engine.pool.sentinels)), time.perf_counter()

    def _collect(self, pending: dict, kind: str, sent: float, broadcast: bool) -> dict[int, tuple]:
        """The replies of the `pending` workers ({worker: sentinel}), by worker: from their pipes, or
        from the mailbox once every worker has answered the broadcast. A stop request gives the
        step in flight STOP_GRACE to finish."""
        replies, answers, first = {}, 0, False
        deadline, stopping = sent + self.engine.watchdog.limit(kind), False
        while pending:
            if not stopping and self.engine.stop_requested():
                # Ctrl-C stops within seconds: the step in flight gets STOP_GRACE to finish
                stopping, deadline = True, min(deadline, time.perf_counter() + STOP_GRACE)
            sources = [self.engine.pool.bell.done] if broadcast else [self.engine.pool.conns[k] for k in pending]
            ready = set(wait(sources + list(pending.values()), min(POLL, max(0.0, deadline - time.perf_counter()))))
            if not ready:
                if time.perf_counter() >= deadline:
                    raise self._late(pending, stopping, deadline - sent, broadcast)
                continue
            if broadcast and self.engine.pool.bell.done in ready:
                answers += self._answered(len(pending) - answers)
                if answers == len(pending):
                    replies.update(self._answers())
                    pending = {}
            for k in list(pending):
                if not broadcast and self.engine.pool.conns[k] in ready:
                    replies[k], size = self.engine.pool.reply(k)
                    self.engine.bytes_received += size
                    del pending[k]
                elif pending[k] in ready:
                    raise self.engine.pool.death(k)
            if kind == "grad" and not first and (replies or answers):
                first = True
                faults.point("wait")  # the first answers are in, the others still computing
        self.engine.watchdog.answered(kind, time.perf_counter() - sent)
        return replies

    def _answered(self, most: int) -> int:
        """How many answers to the broadcast came in; a worker's failure is raised at once."""
        got = self.engine.pool.bell.answered(most)
        if ERROR in got:
            failed = [k for k, row in enumerate(self.engine.pool.mailbox.answers()) if row[:2] == (self.posted, ERROR)]
            self.engine.pool.reply(failed[0])  # its traceback came on its pipe: raises WorkerError
        return len(got)

    def _answers(self) -> dict[int, tuple]:
        rows = self.engine.pool.mailbox.answers()
        self.engine.bytes_received += len(rows) * ROW.size
        return {k: ("ok", loss, correct, []) for k, (_, _, loss, correct) in enumerate(rows)}

    def _late(self, pending: dict, stopping: bool, waited: float, broadcast: bool) -> Exception:
        """Workers that did not answer in time: killed, and the step redone (or, stopping, given up)."""
        if broadcast:
            pending = [k for k, row in enumerate(self.engine.pool.mailbox.answers()) if row[0] != self.posted]
        if stopping:
            for k in pending:
                self.engine.pool.procs[k].kill()  # a worker that cannot answer is ended with the run
            return StopRequested(f"stopped while worker {', '.join(map(str, sorted(pending)))} had not answered")
        return self.engine.pool.silenced(sorted(pending), waited)

