"""--trace: a valid Chrome trace with every worker and every traced step, nested spans only, and
`plot` drawing it; still valid JSON after Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from parallel_nn.parallel import trace
from parallel_nn.run.train import Config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_traced(tiny_data, tmp_path, **overrides):
    settings = dict(workers=3, epochs=2, batch_size=200, data_dir=str(tiny_data), run_dir=str(tmp_path / "run"),
                    quiet=True, trace=str(tmp_path / "trace.json"), trace_steps=4)
    settings.update(overrides)
    train(Config(**settings))
    return json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_the_trace_names_every_process_and_covers_every_traced_step(tiny_data, tmp_path):
    events = run_traced(tiny_data, tmp_path)
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "parent", 1: "worker 0", 2: "worker 1", 3: "worker 2"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and isinstance(e["ts"], (int, float)) for e in spans)
    steps = [e for e in spans if e["pid"] == 0 and e["name"] == "step"]
    assert sorted((e["args"]["epoch"], e["args"]["step"]) for e in steps) == [(ep, s) for ep in (1, 2) for s in range(4)]
    for step in steps:  # each traced step: every worker decoded, ran forward and backward inside it
        lo, hi = step["ts"], step["ts"] + step["dur"]
        for pid in (1, 2, 3):
            inside = {e["name"] for e in spans if e["pid"] == pid and lo <= e["ts"] <= hi}
            assert {"decode", "forward", "backward", "write slot"} <= inside, (step["args"], pid, inside)
        parent = {e["name"] for e in spans if e["pid"] == 0 and lo <= e["ts"] <= hi}
        assert {"dispatch", "wait", "reduce", "update"} <= parent
    assert sum(e["name"] == "evaluate" and e["pid"] == 0 for e in spans) == 2  # every evaluation
    assert {e["pid"] for e in spans if e["name"] == "evaluate"} == {0, 1, 2, 3}


def test_spans_of_one_process_nest_or_follow_each_other(tiny_data, tmp_path):
    events = run_traced(tiny_data, tmp_path, reduce="workers")
    by_pid = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            by_pid[e["pid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    eps = 0.002  # µs: the file's float rounding
    for pid, spans in by_pid.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        open_ends = []  # ends of the spans that enclose the current one
        for start, end, name in spans:
            while open_ends and open_ends[-1] <= start + eps:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + eps, (pid, name, start, end, open_ends[-1])
            open_ends.append(end)
    assert {"barrier", "reduce slice"} <= {n for s in by_pid[1] for n in s[2:]}


def test_an_unwritable_trace_path_is_refused_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "--epochs", "1", "--data-dir", str(tiny_data),
                           "--run-dir", str(tmp_path / "run"), "--trace", str(blocker / "trace.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and "--trace" in done.stderr and "cannot write there" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_trace_interrupted_by_ctrl_c_is_still_valid(tiny_data, tmp_path):
    run, path = tmp_path / "run", tmp_path / "trace.json"
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", "--epochs", "100", "--workers", "2", "--batch-size", "100",
                             "--data-dir", str(tiny_data), "--run-dir", str(run), "--trace", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    events = trace.load(path)
    assert any(e["ph"] == "X" and e["name"] == "step" for e in events)


def test_plot_draws_the_timeline_and_the_step_breakdown(tiny_data, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    from parallel_nn.web.plot import plot_run_all, step_breakdown

    events = run_traced(tiny_data, tmp_path, workers=2)
    written = plot_run_all(str(tmp_path / "run"))
    assert [p.name for p in written] == ["curves.png", "timeline.png", "steps.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    breakdown = step_breakdown(events)
    assert set(breakdown) == {"parent", "worker 0", "worker 1"} and breakdown["worker 0"]["compute"] > 0
