"""The live page's JSON API, without the HTTP: which path is which endpoint, what each answers,
what a predict request must hold, and the server-sent event stream of a run (serve.py serves it).

Every answer is JSON made here from the run directories' files (runinfo.py) and the run's weights
(inference.py); nothing a client sends is evaluated or unpickled, only parsed as JSON and checked.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from parallel_nn import UserError
from parallel_nn.data import mnist
from parallel_nn.run.steplog import PROGRESS_NAME, StepTail, latest_per_step
from parallel_nn.web import runinfo

MAX_BODY = 64 * 1024  # bytes of a request body (a predict request is ~3 KB)
POLL_SECONDS = 0.25  # how often an event stream looks at the run's files
KEEP_ALIVE_SECONDS = 15.0
RUN_ENDPOINTS = {"metrics": "GET", "steps": "GET", "events": "GET", "filters": "GET", "misclassified": "GET",
                 "trace": "GET", "predict": "POST"}


class ApiError(Exception):
    """An answer other than 200: the status and its one-line reason."""

    def __init__(self, status: int, message: str, allow: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.allow = status, message, allow


def route(method: str, segments: list[str]) -> tuple[str, Optional[str]]:
    """(endpoint, run name or None) for a request, or ApiError 404 (no such path) / 405 (another method)."""
    if segments in ([], [""]):
        endpoint, run, allowed = "page", None, "GET"
    elif len(segments) == 2 and segments[0] == "static":
        endpoint, run, allowed = "static", segments[1], "GET"
    elif segments[:2] == ["api", "runs"] and len(segments) in (2, 3) and segments[2:] in ([], [""]):
        endpoint, run, allowed = "runs", None, "GET"
    elif segments[:2] == ["api", "runs"] and len(segments) == 4 and segments[3] in RUN_ENDPOINTS:
        endpoint, run, allowed = segments[3], segments[2], RUN_ENDPOINTS[segments[3]]
    else:
        raise ApiError(404, "no such path")
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
        allow = "GET, HEAD" if allowed == "GET" else allowed
        raise ApiError(405, f"use {allow.replace(', ', ' or ')} here", allow=allow)
    return endpoint, run


def find_run(root: Path, name: str) -> Path:
    """The run directory named `name` among those served (never a path built from the name)."""
    run = runinfo.find_runs(root).get(name)
    if run is None:
        raise ApiError(404, f"no run named {name!r}")
    return run


def int_param(query: dict, name: str, default: int, low: int, high: Optional[int] = None) -> int:
    """Query parameter `name` as an integer >= low (values over `high` are taken as `high`)."""
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # plain digits: not "1_0", " +3", "²"
        raise ApiError(400, f"{name} must be a whole number (digits only), got {text[:40]!r}")
    value = int(text)
    if value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {value}")
    return value if high is None else min(high, value)


def parse_pixels(body: bytes, expected: int = mnist.PIXELS) -> list[int]:
    """The {"pixels": [...]} of a predict request: `expected` whole numbers 0..255, or ApiError 400."""
    try:
        request = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON ({' '.join(str(e).split())[:120]})") from None
    except RecursionError:
        raise ApiError(400, "the body is not JSON this server reads (nested too deeply)") from None
    if not isinstance(request, dict):
        raise ApiError(400, 'the body must be a JSON object: {"pixels": [784 integers 0..255]}')
    pixels = request.get("pixels")
    if not isinstance(pixels, list):
        raise ApiError(400, '"pixels" must be a list of 784 integers 0..255 (row-major, 0 = background)')
    if len(pixels) != expected:
        raise ApiError(400, f'"pixels" must hold {expected} values (28 x 28, row-major), got {len(pixels)}')
    for k, v in enumerate(pixels):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ApiError(400, f'"pixels"[{k}] is not an integer: {json.dumps(v)[:40]}')
        if not 0 <= v <= 255:
            raise ApiError(400, f'"pixels"[{k}] = {v} is out of range 0..255')
    return pixels


def answer(server, endpoint: str, run: Path, query: dict, body: Optional[bytes] = None):
    """The JSON-able answer of a run's endpoint (not the stream); ApiError for a client's mistake."""
    try:
        if endpoint == "metrics":
            return runinfo.read_metrics(run)
        if endpoint == "steps":
            return runinfo.steps_since(run, int_param(query, "since", 0, 0))
        if endpoint == "trace":
            return runinfo.trace_timeline(run, int_param(query, "steps", 4, 1, runinfo.MAX_TRACE_STEPS))
        if endpoint == "filters":
            return _filters(server, run)
        if endpoint == "misclassified":
            return _misclassified(server, run, int_param(query, "limit", 36, 0, 200))
        if endpoint == "predict":
            return _predict(server, run, body or b"")
    except UserError as e:
        raise ApiError(404, str(e)) from None
    raise ApiError(404, "no such path")


def _filters(server, run: Path) -> dict:
    from parallel_nn.web.inference import filters

    return filters(server.cache.model(run))


def _predict(server, run: Path, body: bytes) -> dict:
    from parallel_nn.web.inference import predict

    model = server.cache.model(run)
    return predict(model, parse_pixels(body, model.sizes[0]))


def _misclassified(server, run: Path, limit: int) -> dict:
    """From serve's --data-dir, or else the data directory the run trained on (its config.json).
    Without a test set in either, an answer with no digits and `missing` saying why: the page
    shows it, and a browser logs no failed request."""
    server.cache.model(run)  # 404 first when the run has no weights
    trained_on = (runinfo.read_json_file(run / "config.json") or {}).get("data_dir")
    trained_on = trained_on if isinstance(trained_on, str) and trained_on else None
    try:
        return server.cache.misclassified(run, limit, trained_on)
    except UserError as e:
        message = str(e)
        names = {server.cache.data_dir: "--data-dir", trained_on: "the run's data directory"}
        for path, name in names.items():
            for folder in {os.path.abspath(path), os.path.normpath(path)} if path else ():
                message = message.replace(folder + os.sep, "").replace(folder, name)  # no server paths
        where = "is in neither --data-dir nor the run's data directory" if trained_on else "cannot be read from --data-dir"
        return {"total": 0, "wrong": 0, "items": [], "missing": f"the test set {where}: {message}"}


# ---- the event stream ----

def sse(event: str, data, event_id: Optional[int] = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


class RunWatch:
    """What of a run an event stream has sent, and what is new in its files since."""

    def __init__(self, run: Path, since: int):
        self.run, self.since, self.next = run, since, since
        self.identity = identity(run)  # the directory the stream follows, not whatever takes its name later
        self.tail = StepTail(run / PROGRESS_NAME, run)
        self.steps_per_epoch: Optional[int] = None
        self.epochs: Optional[list] = None  # the metrics lines sent or passed over (None: not looked yet)
        self.metrics_stamp = None
        self.state: Optional[str] = None

    def new_events(self) -> list[str]:
        """The events of steps, epochs and state changes since the last call, in order. The first
        call: the state, then every step with i >= since, the epochs that ended at or after it and
        the latest epoch (so an epoch may come twice: clients key epochs by their number). When the
        run's files were replaced or cut back (its directory used again, a resume): `reset`, then
        everything again from step 0. A run gone: only its state, `gone`; so is a run whose directory
        was swapped for another (a link out of the runs, another folder): nothing of it is sent."""
        state = runinfo.run_state(self.run) if self.in_place() else "gone"
        reset, events = (False, []) if state == "gone" else self.new_content()
        if state != "gone" and not self.in_place():  # swapped while its files were read: they were another's
            state, reset, events = "gone", False, []
        if state != self.state:  # the first one before the rest; a change after what led to it
            events.insert(0 if self.state is None else len(events), sse("state", {"state": state}))
            self.state = state
        return [sse("reset", {})] + events if reset else events

    def in_place(self) -> bool:
        """Whether the run's path still names the directory the stream started on."""
        return self.identity is not None and identity(self.run) == self.identity

    def new_content(self) -> tuple[bool, list[str]]:
        """(whether the run's files started over, the step and epoch events since the last call)."""
        records = self.tail.read()
        metrics = self.read_metrics()
        reset = self.tail.restarted or (metrics is not None and self.epochs is not None
                                        and metrics[: len(self.epochs)] != self.epochs)
        if reset:
            self.since = self.next = 0
            self.epochs = None
            if not self.tail.restarted:
                self.tail = StepTail(self.run / PROGRESS_NAME, self.run)
                records = self.tail.read()
            metrics = runinfo.read_metrics(self.run) if metrics is None else metrics
        return reset, self.content_events(records, metrics)

    def content_events(self, records: list[dict], metrics: Optional[list]) -> list[str]:
        """The step events of `records` not sent yet and the epoch events of `metrics`, in order."""
        items = []
        for record in latest_per_step(records):
            self.steps_per_epoch = record.get("steps", self.steps_per_epoch)
            if record["i"] >= self.next:
                items.append((record["i"], sse("step", record, record["i"])))
                self.next = record["i"] + 1
        for m in self.new_epochs(metrics):
            items.append((self.epoch_end(m), sse("epoch", m)))
        items.sort(key=lambda item: item[0])
        return [text for _, text in items]

    def epoch_end(self, metrics: dict) -> float:
        """Where an epoch's event goes among the steps: after its last step."""
        epoch = metrics.get("epoch")
        if not isinstance(epoch, int) or not isinstance(self.steps_per_epoch, int) or not self.steps_per_epoch:
            return math.inf
        return epoch * self.steps_per_epoch - 0.5

    def read_metrics(self) -> Optional[list]:
        """metrics.jsonl's objects, or None when the file is as it was at the last look."""
        try:
            info = os.stat(self.run / "metrics.jsonl")
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp = None
        if stamp == self.metrics_stamp and self.epochs is not None:
            return None
        self.metrics_stamp = stamp
        return runinfo.read_metrics(self.run)

    def new_epochs(self, metrics: Optional[list]) -> list[dict]:
        if metrics is None:
            return []
        if self.epochs is None:  # the first look: the epochs that ended at or after `since`, and the
            self.epochs = metrics  # latest (a client may have read the metrics just before it came)
            return [m for k, m in enumerate(metrics)
                    if self.since == 0 or self.epoch_end(m) >= self.since or k == len(metrics) - 1]
        new = metrics[len(self.epochs) :]
        self.epochs = metrics
        return new


def identity(path: Path) -> Optional[tuple]:
    """(device, inode) of `path` itself (a link is not followed), None where there is nothing."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def event_stream(run: Path, since: int, closing, gone: Callable[[], bool]) -> Iterator[str]:
    """The text of a run's event stream: what is there (i >= since), then what comes, polled every
    POLL_SECONDS, with a comment line every KEEP_ALIVE_SECONDS; ends when `closing` (a
    threading.Event) is set, `gone()` says the client left, or the run is gone (state `gone`)."""
    watch = RunWatch(run, since)
    yield "retry: 2000\n\n"
    last = time.monotonic()
    while not closing.is_set() and not gone():
        events = watch.new_events()
        if events:
            yield "".join(events)
            last = time.monotonic()
        if watch.state == "gone":
            return
        elif time.monotonic() - last >= KEEP_ALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last = time.monotonic()
        closing.wait(POLL_SECONDS)
