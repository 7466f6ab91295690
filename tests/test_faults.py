"""Nothing lost, whatever happens: a run is stopped or broken at every phase, then checked.

Each case runs the trainer as a user would (a process group of its own, 2 workers, fork) with a
fault injected at an exact point (parallel_nn/faults.py), and checks: the documented exit code and
at most one line of error; nothing left running, mapped or half written; and, where the run can
be resumed, a `--resume` that ends with weights bit-identical to an uninterrupted run.

By default a sample of the matrix runs (every phase once, every fault once); the whole matrix,
phases x faults, runs with PARALLEL_NN_FAULT_MATRIX=1 (CI does, once).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 300 examples in batches of 100: 3 steps an epoch, 3 epochs
ARGS = ["--workers", "2", "--start-method", "fork", "--batch-size", "100", "--limit-train", "300", "--limit-test", "100",
        "--epochs", "3"]
STEP_HIT = "5"  # the 5th step: epoch 2, a checkpoint (epoch 1's) already on disk
SAVE_HIT = "2"  # the 2nd save, evaluation, epoch end: epoch 2's

PARENT_PHASES = ["dispatch", "wait", "reduce", "update", "evaluate", "epoch", "resume"] + [
    f"write {name} {when} rename" for name in ("checkpoint.json", "weights.json", "metrics.jsonl")
    for when in ("before", "after")]
PARENT_FAULTS = ["sigint", "sigterm", "sighup", "kill"]
WORKER_PHASES = ["compute", "worker evaluate", "worker update"]
WORKER_FAULTS = ["kill", "stop", "raise"]
WRITES = [f"write {name} before rename" for name in ("checkpoint.json", "weights.json", "metrics.jsonl")]

CASES = ([(phase, fault) for phase in PARENT_PHASES for fault in PARENT_FAULTS]
         + [(phase, "enospc") for phase in WRITES]
         + [(phase, fault) for phase in WORKER_PHASES[:2] for fault in WORKER_FAULTS])
# the default sample: every phase and every fault at least once
SAMPLE = {("dispatch", "sigint"), ("wait", "sigterm"), ("reduce", "sighup"), ("update", "kill"), ("evaluate", "sigterm"),
          ("epoch", "kill"), ("resume", "sigterm"), ("write checkpoint.json before rename", "kill"),
          ("write checkpoint.json after rename", "sighup"), ("write weights.json before rename", "enospc"),
          ("write metrics.jsonl after rename", "sigint"), ("write weights.json after rename", "sigterm"),
          ("write metrics.jsonl before rename", "enospc"), ("compute", "stop"), ("compute", "raise"),
          ("worker evaluate", "kill")}
FULL = os.environ.get("PARALLEL_NN_FAULT_MATRIX") == "1"


def hit(phase: str) -> str:
    return STEP_HIT if phase in ("dispatch", "wait", "reduce", "update", "compute", "worker update") else SAVE_HIT


def expected_code(fault: str) -> int:
    return {"sigint": 130, "sigterm": 130, "sighup": 130, "kill": -9, "enospc": 1, "raise": 1}[fault]


class Trainer:
    """Runs the CLI in its own session; every process it starts carries a unique mark."""

    def __init__(self, tmp_path: Path, data: Path):
        self.tmp, self.data = tmp_path, data
        self.mark = uuid.uuid4().hex

    def run(self, *args, fault: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, PARALLEL_NN_TEST_MARK=self.mark)
        if fault:
            env.update(PARALLEL_NN_FAULT=fault, PARALLEL_NN_FAULT_ONCE=str(self.tmp / f"fired-{uuid.uuid4().hex}"))
        return subprocess.run([sys.executable, "-m", "parallel_nn", *args], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=timeout, start_new_session=True)

    def train(self, run_dir: Path, *extra, fault: str | None = None) -> subprocess.CompletedProcess:
        return self.run(*ARGS, "--data-dir", str(self.data), "--run-dir", str(run_dir), *extra, fault=fault)

    def resume(self, run_dir: Path, *extra, fault: str | None = None) -> subprocess.CompletedProcess:
        return self.run("--resume", str(run_dir), *extra, fault=fault)

    def survivors(self, seconds: float = 5.0) -> list[int]:
        """Processes still carrying the mark after up to `seconds` (orphaned workers notice within 1 s)."""
        deadline = time.monotonic() + seconds
        while True:
            left = []
            for p in psutil.process_iter(["pid"]):
                try:
                    if p.environ().get("PARALLEL_NN_TEST_MARK") == self.mark and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p.pid)
                except psutil.Error:
                    pass
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted run every case must end equal to."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = Trainer(run_dir.parent, tiny_data).train(run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir


def finished_like(run_dir: Path, straight: Path) -> None:
    assert (run_dir / "weights.json").read_bytes() == (straight / "weights.json").read_bytes()
    losses = [[m["test_loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (run_dir, straight)]
    assert losses[0] == losses[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line and not line.startswith("warning: ")]


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.glob(".*.tmp")]


@pytest.mark.parametrize("phase, fault", [
    pytest.param(p, f, marks=() if FULL or (p, f) in SAMPLE else pytest.mark.skip("in the full matrix only "
                                                                                  "(PARALLEL_NN_FAULT_MATRIX=1)"))
    for p, f in CASES])
def test_fault(phase, fault, tiny_data, tmp_path, straight):
    check_fault(phase, fault, Trainer(tmp_path, tiny_data), tmp_path / "run", straight)


# --reduce sharded: the workers also update their slices of the weights and of the optimizer's
# state, double-buffered in shared memory. Broken at each of its own points, it must end with the
# default mode's uninterrupted weights, to the bit.
SHARDED_CASES = [("compute", "kill"), ("compute", "raise"), ("worker update", "kill"), ("worker update", "stop"),
                 ("wait", "sigterm"), ("reduce", "kill"), ("update", "sigint"), ("evaluate", "sighup")]


@pytest.mark.parametrize("phase, fault", SHARDED_CASES)
def test_fault_with_sharded_updates(phase, fault, tiny_data, tmp_path, straight):
    check_fault(phase, fault, Trainer(tmp_path, tiny_data), tmp_path / "run", straight, ["--reduce", "sharded"])


def check_fault(phase: str, fault: str, trainer: Trainer, run_dir: Path, straight: Path, mode: list = ()) -> None:
    shm_before = set(glob.glob("/dev/shm/*"))
    extra = [*mode, "--worker-timeout", "3"] if fault == "stop" else [*mode]
    spec = f"{phase}:{fault}:{hit(phase) if phase != 'resume' else 1}"
    if phase == "resume":  # stop the run mid-epoch first, then break its resume
        assert trainer.train(run_dir, *mode, fault=f"update:sigint:{STEP_HIT}").returncode == 130
        done = trainer.resume(run_dir, fault=spec)
    else:
        done = trainer.train(run_dir, *extra, fault=spec)
    what = f"{spec} {' '.join(mode)}\nstdout: {done.stdout}\nstderr: {done.stderr}"

    code = 0 if fault in ("stop",) or (fault == "kill" and phase in WORKER_PHASES) else expected_code(fault)
    assert done.returncode == code, what
    assert "Traceback" not in done.stderr, what
    errors = error_lines(done.stderr)
    assert len(errors) == (1 if code == 1 else 0), what
    if code == 130:
        assert "interrupted: saved" in done.stdout and "--resume" in done.stdout, what
    if fault in ("stop", "kill") and phase in WORKER_PHASES:
        assert "restarting the workers and redoing the step" in done.stderr, what
    assert trainer.survivors() == [], what
    assert set(glob.glob("/dev/shm/*")) <= shm_before
    if code != -9:
        assert leftovers(run_dir) == [], what

    if code != 0:  # resumable: it must end exactly where the uninterrupted run did
        again = trainer.resume(run_dir)
        assert again.returncode == 0, f"{what}\nresume: {again.stderr}"
        assert leftovers(run_dir) == []
    finished_like(run_dir, straight)


def test_the_matrix_covers_every_phase_and_fault():
    phases = {p for p, _ in CASES}
    assert phases == set(PARENT_PHASES + WORKER_PHASES[:2])  # "worker update" happens with --reduce sharded only
    assert {p for p, _ in SAMPLE} == phases and {f for _, f in SAMPLE} == {f for _, f in CASES}
    assert SAMPLE <= set(CASES)
