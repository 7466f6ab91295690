"""What the live page shows of run directories, read from their files on every request: so it
follows a run another process is training, and shows past ones. Nothing here writes.

A run is named by its directory's name; a name is looked up among the directories found, never
joined onto a path, so no request can reach outside the folder being served: a symlinked run
directory is not listed, and a run's file is read only if it is a regular file whose real path is
inside the run (files.open_regular: never a FIFO or a device, never a link out). The one file read
from elsewhere is the trace that config.json names (the user chose where it goes): only if it is a
regular file, and only what trace_timeline makes of it is answered.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from parallel_nn import UserError
from parallel_nn.files import read_limited
from parallel_nn.run import rundir
from parallel_nn.run.steplog import PROGRESS_NAME, StepIndex
from parallel_nn.web.plot import PHASES, timeline_window

MAX_TRACE_STEPS = 20
MAX_STEPS = 5000  # steps in one answer of /steps (`more` says that others follow)
KEEP_INDEXES = 8  # runs whose progress.jsonl index is kept


def is_run(directory: Path) -> bool:
    return bool(rundir.run_files(directory))


def find_runs(root: Path) -> dict[str, Path]:
    """name -> directory: `root` itself if it is a run (it holds metrics.jsonl or config.json),
    else each run directly inside it (hidden folders, symlinks and names a URL cannot carry skipped)."""
    if (root / "metrics.jsonl").exists() or (root / "config.json").exists():
        return {root.resolve().name: root}
    runs = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return {}
    for entry in entries:
        if servable(entry.name) and entry.is_dir(follow_symlinks=False) and is_run(Path(entry.path)):
            runs[entry.name] = Path(entry.path)
    return runs


def servable(name: str) -> bool:
    """Whether a URL can name this directory: not hidden (nor `.`, `..`), and valid UTF-8 (a name that is
    not comes as lone surrogates, which no URL carries)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not name.startswith(".") and "/" not in name and "\0" not in name


def read_json_file(path: Path) -> Optional[dict]:
    """A run's JSON object file (a regular file inside its run), or None."""
    try:
        value = json.loads(read_limited(path, path.parent))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's objects, in order (none if it is not there yet, or not a regular file in the run)."""
    try:
        lines = read_limited(run / "metrics.jsonl", run).decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    metrics = []
    for line in lines:
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            metrics.append(value)
    return metrics


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def running(run: Path) -> bool:
    """rundir.running, for a .lock that is a regular file (reading a FIFO would wait for ever)."""
    return _regular(run / rundir.LOCK_NAME) and rundir.running(run)


def state(run: Path, epochs_done: int, epochs_planned: Optional[int]) -> str:
    """running (a live trainer holds the lock), finished (every planned epoch done), stopped (some, or
    none but a trainer has been at it: it left steps or its lock), new (nothing done yet)."""
    if running(run):
        return "running"
    if epochs_done and epochs_planned and epochs_done >= epochs_planned:
        return "finished"
    if epochs_done or os.path.lexists(run / PROGRESS_NAME) or os.path.lexists(run / rundir.LOCK_NAME):
        return "stopped"
    return "new"


def run_state(run: Path) -> str:
    """state(), or `gone` once the directory is no longer a run (deleted, or emptied with no trainer in it)."""
    if not os.path.isdir(run) or (not is_run(run) and not running(run)):
        return "gone"
    config = read_json_file(run / "config.json") or {}
    return state(run, len(read_metrics(run)), _whole(config.get("epochs")))


def _whole(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def updated(run: Path) -> float:
    """Unix time of the newest run file."""
    newest = 0.0
    for name in (*rundir.RUN_FILES, rundir.LOCK_NAME):
        try:
            newest = max(newest, os.lstat(run / name).st_mtime)
        except OSError:
            pass
    return newest


def summary(name: str, run: Path) -> dict:
    config = read_json_file(run / "config.json") or {}
    metrics = read_metrics(run)
    last = metrics[-1] if metrics else {}
    epochs = _whole(config.get("epochs"))
    return {
        "name": name,
        "state": state(run, len(metrics), epochs),
        "python": last.get("python", config.get("python")),
        "backend": last.get("backend", config.get("backend")),
        "workers": _whole(last.get("workers", config.get("workers"))),
        "epoch": len(metrics),
        "epochs": epochs,
        "test_accuracy": last.get("test_accuracy"),
        "has_trace": trace_path(config) is not None,
        "updated": updated(run),
    }


def list_runs(root: Path) -> list[dict]:
    """Every run's summary, newest first."""
    runs = [summary(name, path) for name, path in find_runs(root).items()]
    runs.sort(key=lambda r: (r["updated"], r["name"]), reverse=True)
    return runs


_indexes: "OrderedDict[str, StepIndex]" = OrderedDict()
_indexes_lock = threading.Lock()


def step_index(run: Path) -> StepIndex:
    """The run's progress.jsonl index, kept between requests for the last KEEP_INDEXES runs asked about."""
    key = str(run / PROGRESS_NAME)
    with _indexes_lock:
        index = _indexes.pop(key, None) or StepIndex(run / PROGRESS_NAME, run)
        _indexes[key] = index
        while len(_indexes) > KEEP_INDEXES:
            _indexes.popitem(last=False)
    return index


def steps_since(run: Path, since: int, limit: int = MAX_STEPS) -> dict:
    """The steps with i >= since (at most `limit`), the next i to ask for, whether more follow, and the
    progress file's origin (it changes when the file is replaced: start over from 0)."""
    steps, more, origin = step_index(run).since(since, limit)
    return {"steps": steps, "next": steps[-1]["i"] + 1 if steps else since, "more": more, "origin": origin}


def trace_path(config: dict) -> Optional[str]:
    """The trace config.json names, if it is a regular file (it may be anywhere: the user chose)."""
    path = config.get("trace")
    if not isinstance(path, str) or not path:
        return None
    try:
        return path if stat.S_ISREG(os.stat(path).st_mode) else None
    except (OSError, ValueError):
        return None


def read_trace(config: dict) -> tuple[dict, list, list]:
    """(pid -> process name, the X spans, the parent's step spans in time order) of the run's trace,
    every event checked; UserError (one line, no path) for a trace missing or not readable."""
    path = trace_path(config)
    if path is None:
        raise UserError("this run has no trace (train with --trace FILE.json)")
    try:
        events = json.loads(read_limited(Path(path)))
    except OSError as e:
        raise UserError(f"the trace cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise UserError("not a readable trace: not JSON (it is written when the run ends)") from None
    events = events.get("traceEvents") if isinstance(events, dict) else events
    if not isinstance(events, list):
        raise UserError("not a readable trace: no list of traceEvents")
    return trace_events(events)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trace_events(events: list) -> tuple[dict, list, list]:
    """plot.trace_parts, for events that may be anything: UserError for one that is not as written."""
    names, spans = {}, []
    for k, e in enumerate(events):
        if not isinstance(e, dict) or e.get("ph") not in ("M", "X"):
            continue
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        if _whole(e.get("pid")) is None:
            raise UserError(f"not a readable trace: event {k} has no whole-number pid")
        if e["ph"] == "M" and e.get("name") == "process_name":
            if not isinstance(args.get("name"), str):
                raise UserError(f"not a readable trace: process_name event {k} has no args.name")
            names[e["pid"]] = args["name"]
        elif e["ph"] == "X":
            if not (isinstance(e.get("name"), str) and _number(e.get("ts")) and _number(e.get("dur")) and e["dur"] >= 0):
                raise UserError(f"not a readable trace: span {k} lacks a name, ts or dur")
            if e["pid"] == 0 and e["name"] == "step" and (_whole(args.get("epoch")) is None or _whole(args.get("step")) is None):
                raise UserError(f"not a readable trace: step span {k} lacks args.epoch or args.step")
            spans.append(e)
    steps = sorted((e for e in spans if e["pid"] == 0 and e["name"] == "step"), key=lambda e: e["ts"])
    return names, spans, steps


def trace_timeline(run: Path, shown: int) -> dict:
    """The spans of `shown` traced steps of the last traced epoch (like plot's timeline.png), in ms
    from the first shown step's start, clipped to the shown steps; UserError if there is none."""
    names, spans, steps = read_trace(read_json_file(run / "config.json") or {})
    if not steps:
        raise UserError("the trace has no traced steps yet (it is written when the run ends)")
    try:
        return _timeline(names, spans, steps, shown)
    except (KeyError, TypeError, ValueError, IndexError) as e:  # what trace_events does not foresee
        raise UserError(f"not a readable trace ({type(e).__name__})") from None


def _timeline(names: dict, spans: list, steps: list, shown: int) -> dict:
    epoch, window = timeline_window(steps, max(1, min(MAX_TRACE_STEPS, shown)))
    lo, hi = window[0]["ts"], window[-1]["ts"] + window[-1]["dur"]
    shown_spans = []
    for e in sorted(spans, key=lambda e: (e["pid"], e["ts"])):
        start, end = max(lo, e["ts"]), min(hi, e["ts"] + e["dur"])
        if e["name"] in PHASES and e["pid"] in names and start < end:
            shown_spans.append({"process": names[e["pid"]], "name": e["name"], "category": PHASES[e["name"]][0],
                                "start_ms": (start - lo) / 1000, "duration_ms": (end - start) / 1000})
    return {"epoch": epoch, "processes": [names[pid] for pid in sorted(names)], "spans": shown_spans,
            "steps": [{"step": s["args"]["step"] + 1, "start_ms": (s["ts"] - lo) / 1000, "duration_ms": s["dur"] / 1000}
                      for s in window]}
