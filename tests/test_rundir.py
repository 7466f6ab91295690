"""Never lose a run: refusals leave every byte in place, runs never share a directory, stops are clean."""

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_nn.run import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "parallel_nn", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def start(*args, cwd=ROOT):
    """A trainer in its own process group, as a terminal would run it."""
    return subprocess.Popen([sys.executable, "-m", "parallel_nn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, start_new_session=True)


def digests(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), path


def shm_segments():
    return set(glob.glob("/dev/shm/psm_*"))


@pytest.fixture
def finished_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    done = cli("--epochs", "2", "--workers", "2", "--batch-size", "200", "--data-dir", str(tiny_data), "--run-dir", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    return run


def test_a_new_run_refuses_a_directory_that_holds_one(finished_run, tiny_data):
    before = digests(finished_run)
    done = cli("--epochs", "1", "--limit-train", "500", "--data-dir", str(tiny_data), "--run-dir", str(finished_run))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].count("already holds a run") == 1
    assert f"--resume {finished_run}" in done.stderr and "--overwrite" in done.stderr
    assert digests(finished_run) == before  # every byte unchanged


def test_overwrite_replaces_on_purpose_and_is_refused_with_resume(finished_run, tiny_data):
    before = digests(finished_run)
    done = cli("--resume", str(finished_run), "--overwrite")
    assert done.returncode == 2 and "choose one" in done.stderr and digests(finished_run) == before
    done = cli("--epochs", "1", "--limit-train", "400", "--batch-size", "200", "--workers", "2", "--data-dir", str(tiny_data),
               "--run-dir", str(finished_run), "--overwrite", "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and json.loads((finished_run / "config.json").read_text())["limit_train"] == 400


def test_an_empty_existing_directory_is_fine(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    done = cli("--epochs", "1", "--workers", "1", "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "empty"), "--quiet")
    assert done.returncode == 0, done.stderr


def test_default_directories_never_collide(tmp_path, tiny_data):
    first, second = rundir.create_default(tmp_path / "runs"), rundir.create_default(tmp_path / "runs")
    assert first != second and second.name.startswith(first.name)  # the same second: a suffix
    procs = [start("--epochs", "1", "--workers", "1", "--data-dir", str(tiny_data), "--quiet", cwd=tmp_path) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    made = [p for p in (tmp_path / "runs").iterdir() if (p / "weights.json").exists()]
    assert len(made) == 2  # two trainers started together, two directories


def test_a_running_trainer_holds_its_directory_and_a_killed_one_does_not(tiny_data, tmp_path):
    before = shm_segments()
    run = tmp_path / "run"
    proc = start("--epochs", "200", "--workers", "1", "--batch-size", "100", "--data-dir", str(tiny_data), "--run-dir", str(run))
    try:
        wait_for(run / "metrics.jsonl")  # an epoch is done and checkpointed
        for args in (["--resume", str(run)], ["--run-dir", str(run), "--overwrite", "--data-dir", str(tiny_data)]):
            done = cli(*args)
            assert done.returncode == 1 and f"in use by another trainer (pid {proc.pid})" in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1
        assert rundir.holder(run) == proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert rundir.holder(run) is None  # the kernel released the lock with the process
    assert shm_segments() <= before  # SIGKILL to the whole group leaks no shared memory either
    epochs_done = json.loads((run / "checkpoint.json").read_text())["epoch"]
    done = cli("--resume", str(run), "--epochs", str(epochs_done + 1), "--quiet")
    assert done.returncode == 0, done.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == epochs_done + 1


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_or_terminate_to_the_group_checkpoints_quietly(tiny_data, tmp_path, sig):
    """A closed terminal (SIGHUP) or `timeout`/`kill -TERM -PGID` reach the workers too: their deaths
    are part of stopping, not a fault to warn about and restart."""
    before = shm_segments()
    run = tmp_path / "run"
    proc = start("--epochs", "200", "--workers", "2", "--batch-size", "100", "--data-dir", str(tiny_data), "--run-dir", str(run))
    wait_for(run / "metrics.jsonl")
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: saved" in out and "restarting" not in err and "warning" not in err and "Traceback" not in err
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] >= 1
    assert shm_segments() <= before


def test_resuming_a_finished_run_says_so(finished_run):
    before = digests(finished_run)
    done = cli("--resume", str(finished_run))
    assert done.returncode == 0 and "has finished its 2 epochs" in done.stderr and "--epochs N" in done.stderr
    # every run file is untouched; .lock now names this process, which took the lock before reading
    # the checkpoint (so a resume racing a finishing trainer never reads a stale one)
    before.pop(".lock")
    assert {k: v for k, v in digests(finished_run).items() if k != ".lock"} == before


@pytest.mark.parametrize("args", [["--momentum", "1.5"], ["--momentum", "1"], ["--momentum", "-0.1"], ["--weight-decay", "nan"],
                                  ["--lr", "inf"], ["--shift", "9"], ["--rotate", "31"], ["--limit-train", "0"], ["--epochs", "-1"]])
def test_numeric_flags_out_of_range_are_usage_errors(args):
    done = cli(*args)
    assert done.returncode == 2 and "error:" in done.stderr


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_while_spawned_workers_start_is_quiet(tiny_data, tmp_path, delay):
    proc = start("--epochs", "50", "--workers", "8", "--start-method", "spawn", "--batch-size", "100",
                 "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run"))
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "restarting" not in err, err
