"""`--trace FILE.json`: a timeline of the parent and every worker, in Chrome's trace-event format.

Perfetto (ui.perfetto.dev) and chrome://tracing open the file: one row per process ("parent",
"worker 0", ..., "worker 3 @ node" on Ray), complete ("ph": "X") spans in microseconds. Only the
first `--trace-steps` steps of each epoch and each evaluation are recorded, so a long run's file
stays small; tracing is off unless asked for.

Clocks. Spans are taken with time.perf_counter_ns(), which on Linux is CLOCK_MONOTONIC: one
clock for every process on a machine, so local workers' spans need no correction. A Ray actor
on another node has its own clock; its spans are placed by assuming the message latency is the
same both ways: the driver knows when it sent a call and when the reply came (t0, t1), the actor
says how long it held the call (d), and its spans start at t0 + (t1 - t0 - d) / 2. The error is at
most half of (t1 - t0 - d), the round trip's transport time, which the trace records per call
("alignment_error_us" in the span's args).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from parallel_nn import UserError, atomic
from parallel_nn.events import Listener
from parallel_nn.files import open_regular

Span = tuple[str, int, int]  # (name, start ns, end ns) on the recording process's clock


def now() -> int:
    return time.perf_counter_ns()


class Recorder:
    """A worker's spans for one message: `with rec.span("decode"): ...`; a no-op when off."""

    def __init__(self, on: bool):
        self.on = on
        self.spans: list[Span] = []

    def span(self, name: str) -> "_Timed":
        return _Timed(self, name)


class _Timed:
    def __init__(self, recorder: Recorder, name: str):
        self.recorder, self.name = recorder, name

    def __enter__(self):
        if self.recorder.on:
            self.start = now()
        return self

    def __exit__(self, *exc):
        if self.recorder.on:
            self.recorder.spans.append((self.name, self.start, now()))


class Tracer(Listener):
    """The parent's side: its own spans, the workers' spans it is handed, and the file. As a run's
    listener it records the first `steps` steps of each epoch, and every evaluation."""

    def __init__(self, path: str | Path, steps: int = 30):
        self.path, self.steps = Path(path), steps
        self.active = False  # recording now (a traced step, an evaluation)
        self.events: list[dict] = []
        self.names: dict[int, str] = {0: "parent"}
        self.check_writable()

    def check_writable(self) -> None:
        """Refuse an unwritable path before training starts, not after the run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, {"traceEvents": []})
        except (OSError, UserError) as e:
            raise UserError(f"--trace {self.path}: cannot write there ({e})") from None

    def step_starting(self, run) -> None:
        self.active = run.step < self.steps

    def evaluating(self, run) -> None:
        self.active = True

    def span(self, name: str, **args) -> "_ParentSpan":
        return _ParentSpan(self, name, args)

    def add(self, pid: int, name: str, start_ns: int, end_ns: int, **args) -> None:
        event = {"name": name, "ph": "X", "pid": pid, "tid": 0, "ts": start_ns / 1000, "dur": (end_ns - start_ns) / 1000}
        if args:
            event["args"] = args
        self.events.append(event)

    def worker(self, k: int, label: str, spans: list[Span], offset_ns: int = 0, **args) -> None:
        """Add worker k's spans, moved onto the parent's clock by offset_ns."""
        self.names[k + 1] = label
        for name, start, end in spans:
            self.add(k + 1, name, start + offset_ns, end + offset_ns, **args)

    def write(self) -> None:
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}
                for pid, name in sorted(self.names.items())]
        sort = [{"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
                for pid in sorted(self.names)]
        atomic.write_json(self.path, {"traceEvents": meta + sort + self.events, "displayTimeUnit": "ms",
                                      "otherData": {"producer": "parallel_nn", "pid": os.getpid()}})


class _ParentSpan:
    def __init__(self, tracer: Tracer, name: str, args: dict):
        self.tracer, self.name, self.args = tracer, name, args

    def __enter__(self):
        self.start = now() if self.tracer.active else None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            self.tracer.add(0, self.name, self.start, now(), **self.args)


class NoTracer(Listener):
    """What an engine holds when tracing is off: every call is a no-op."""

    active = False

    def span(self, name: str, **args):
        return _Nothing()

    def worker(self, *args, **kwargs) -> None:
        pass

    def add(self, *args, **kwargs) -> None:
        pass


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def load(path: str | Path) -> list[dict]:
    try:
        return json.loads(Path(path).read_text())["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable trace ({e})") from None


def symmetric_offset(sent_ns: int, received_ns: int, held_ns: int, worker_start_ns: int) -> tuple[int, float]:
    """(offset to add to a remote worker's times, the alignment error bound in µs); see the module doc."""
    transport = max(0, received_ns - sent_ns - held_ns)
    start_on_parent = sent_ns + transport // 2
    return start_on_parent - worker_start_ns, transport / 2000


TRACE_START = b'{"traceEvents": '  # how every trace this module writes begins


def is_trace(path: Path) -> bool:
    """An existing trace, or an empty file; never what is not a regular file (files.open_regular: a FIFO would block)."""
    try:
        with open_regular(path) as f:
            return os.fstat(f.fileno()).st_size == 0 or f.read(len(TRACE_START)) == TRACE_START
    except OSError:
        return False


def optional(path: Optional[str], steps: int):
    return Tracer(path, steps) if path else NoTracer()
