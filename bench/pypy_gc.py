"""PyPy's collector crash, reproduced, and the setting that keeps clear of it.

    python -m bench.pypy_gc [--runs 12] [--trainings 4] [--markdown FILE]

PyPy before 7.3.16 has a bug in its incremental garbage collector: a list copied while a major
collection is half-way through marking can lose track of what it holds, and the process dies of a
segmentation fault. It shows, now and then, as a crash of `make test` while pytest rewrites a test
file's asserts (this project's CI, 2026-12-07). This study makes it likely: pytest collects this
project's tests and rewrites every file (nothing cached), in a PyPy whose collector runs major
collections back to back (PYPY_GC_MAJOR_COLLECT=1.05), on a 512 KB young generation, marking in
PyPy's own small steps or in one step (`PYPY_GC_INCREMENT_STEP=64GB`: the trainer's and make's
setting, parallel_nn/__main__.py). The two alternate, run by run; the table counts the crashes.

And what one-step marking costs the trainer: `python -m parallel_nn --workers 2 --epochs 3` with
its own settings, marking in one step or in PyPy's steps (twice the young generation, PyPy's
default), alternated; the table gives the median over the trainings of epochs 2-3 (after the JIT's
warm-up), of the median step and of its 90th percentile (from progress.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import data
from parallel_nn.__main__ import NURSERY, ONE_STEP_MARKING

ROOT = Path(__file__).resolve().parent.parent
STRESS = {"PYPY_GC_NURSERY": "512KB", "PYPY_GC_MAJOR_COLLECT": "1.05", "PYTHONDONTWRITEBYTECODE": "1"}
MARKING = {"in the smallest steps": "1", "in one step (the trainer's)": ONE_STEP_MARKING}
PYPY_STEP = f"{2 * int(NURSERY.removesuffix('MB'))}MB"  # PyPy's default increment: twice the young generation
TRAIN = ["-m", "parallel_nn", "--workers", "2", "--epochs", "3", "--quiet"]
COLLECT = ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests", "bench"]


def collect(increment_step: str) -> tuple[str, float]:
    """Collect the tests once under the stress settings: ("ok", "segfault" or "failed", seconds).
    The collector's bug also shows as a corrupted AST now and then ("expected some sort of expr,
    but got [...]" from pytest's rewriting): a failure, counted apart."""
    env = {**os.environ, **STRESS, "PYPY_GC_INCREMENT_STEP": increment_step}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *COLLECT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode == -11 or "Segmentation fault" in done.stderr:
        return "segfault", seconds
    return ("ok" if done.returncode == 0 else "failed"), seconds


def train(increment_step: str) -> tuple[float, float, float]:
    """One training under the trainer's settings but this marking: (seconds of epochs 2-3, median
    step ms, 90th percentile step ms, over those epochs)."""
    with tempfile.TemporaryDirectory() as run_dir:
        env = {**os.environ, "PYPY_GC_INCREMENT_STEP": increment_step}
        done = subprocess.run([sys.executable, *TRAIN, "--run-dir", run_dir], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            sys.exit(f"the training failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        epochs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        steps = [json.loads(line) for line in open(os.path.join(run_dir, "progress.jsonl"))]
    batch = 500
    ms = sorted(1000 * batch / step["examples_per_second"] for step in steps if step["epoch"] > 1)
    return sum(e["epoch_seconds"] for e in epochs[1:]), ms[len(ms) // 2], ms[int(0.9 * len(ms))]


def crash_table(runs: int) -> list[str]:
    outcomes = {name: [] for name in MARKING}
    seconds = {name: [] for name in MARKING}
    for run in range(runs):
        for name, step in MARKING.items():
            outcome, took = collect(step)
            outcomes[name].append(outcome)
            seconds[name].append(took)
            print(f"run {run + 1}/{runs}, marking {name}: {outcome} ({took:.1f} s)", file=sys.stderr)
    version = ".".join(map(str, sys.pypy_version_info[:3]))
    lines = [f"PyPy {version}, pytest collecting this project's tests with nothing cached, "
             f"{' '.join(f'{k}={v}' for k, v in STRESS.items() if k.startswith('PYPY'))}:", "",
             "| marking | runs | segmentation faults | other failures | median run |", "|---|---:|---:|---:|---:|"]
    for name in MARKING:
        count = outcomes[name].count
        lines.append(f"| {name} | {runs} | {count('segfault')} | {count('failed')} | {statistics.median(seconds[name]):.1f} s |")
    return lines


def cost_table(trainings: int) -> list[str]:
    marking = {f"PyPy's steps ({PYPY_STEP})": PYPY_STEP, f"one step ({ONE_STEP_MARKING})": ONE_STEP_MARKING}
    results = {name: [] for name in marking}
    for run in range(trainings):
        for name, step in marking.items():
            results[name].append(train(step))
            print(f"training {run + 1}/{trainings}, marking in {name}: epochs 2-3 {results[name][-1][0]:.2f} s",
                  file=sys.stderr)
    lines = ["", f"`python -m parallel_nn --workers 2 --epochs 3`, {trainings} trainings each, alternated "
             "(medians over the trainings):", "",
             "| marking | epochs 2-3 | step, median | step, 90th percentile |", "|---|---:|---:|---:|"]
    for name, rows in results.items():
        epochs, median, p90 = (statistics.median(column) for column in zip(*rows))
        lines.append(f"| {name} | {epochs:.2f} s | {median:.1f} ms | {p90:.1f} ms |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12, help="collections per setting (default 12)")
    parser.add_argument("--trainings", type=int, default=4, help="trainings per marking, to time them (default 4; 0: none)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.runs < 1 or args.trainings < 0:
        parser.error("--runs must be at least 1, --trainings at least 0")
    if platform.python_implementation() != "PyPy":
        sys.exit("this study needs PyPy: run it with the venv `make` builds on PyPy (.venv/bin/python)")
    lines = crash_table(args.runs) + (cost_table(args.trainings) if args.trainings else [])
    data.report(lines, args.markdown)


if __name__ == "__main__":
    main()
