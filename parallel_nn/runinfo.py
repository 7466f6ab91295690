"""What the live page shows of run directories, read from their files on every request: so it
follows a run another process is training, and shows past ones. Nothing here writes.

A run is named by its directory's name; a name is looked up among the directories found, never
joined onto a path, so no request can reach outside the folder being served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from . import UserError, rundir, trace
from .plot import PHASES, trace_of, trace_parts, timeline_window
from .steplog import PROGRESS_NAME, read_steps

MAX_TRACE_STEPS = 20


def is_run(directory: Path) -> bool:
    return bool(rundir.run_files(directory))


def find_runs(root: Path) -> dict[str, Path]:
    """name -> directory: `root` itself if it is a run (it holds metrics.jsonl or config.json),
    else each run directly inside it (hidden folders skipped)."""
    if (root / "metrics.jsonl").exists() or (root / "config.json").exists():
        return {root.resolve().name: root}
    runs = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return {}
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir() and is_run(Path(entry.path)):
            runs[entry.name] = Path(entry.path)
    return runs


def read_json_file(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's objects, in order (none if it is not there yet)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    metrics = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            metrics.append(value)
    return metrics


def state(run: Path, epochs_done: int, epochs_planned: Optional[int]) -> str:
    if rundir.running(run):
        return "running"
    if epochs_done and epochs_planned and epochs_done >= epochs_planned:
        return "finished"
    return "stopped" if epochs_done else "new"


def run_state(run: Path) -> str:
    config = read_json_file(run / "config.json") or {}
    return state(run, len(read_metrics(run)), _whole(config.get("epochs")))


def _whole(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def updated(run: Path) -> float:
    """Unix time of the newest run file."""
    newest = 0.0
    for name in (*rundir.RUN_FILES, rundir.LOCK_NAME):
        try:
            newest = max(newest, (run / name).stat().st_mtime)
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
        "has_trace": trace_of(str(run)) is not None,
        "updated": updated(run),
    }


def list_runs(root: Path) -> list[dict]:
    """Every run's summary, newest first."""
    runs = [summary(name, path) for name, path in find_runs(root).items()]
    runs.sort(key=lambda r: (r["updated"], r["name"]), reverse=True)
    return runs


def steps_since(run: Path, since: int) -> dict:
    steps = [r for r in read_steps(run / PROGRESS_NAME) if r["i"] >= since]
    return {"steps": steps, "next": steps[-1]["i"] + 1 if steps else since}


def trace_timeline(run: Path, shown: int) -> dict:
    """The spans of `shown` traced steps of the last traced epoch (like plot's timeline.png), in ms
    from the first shown step's start, clipped to the shown steps; UserError if there is none."""
    path = trace_of(str(run))
    if path is None:
        raise UserError("this run has no trace (train with --trace FILE.json)")
    names, spans, steps = trace_parts(trace.load(path))
    if not steps:
        raise UserError("the trace has no traced steps yet (it is written when the run ends)")
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
