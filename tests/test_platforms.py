"""macOS's and Windows' code paths, exercised on Linux by taking away what those platforms lack
(tools/emulate/sitecustomize.py): the code chooses by capability, so without memfd it takes the
macOS path (an unlinked POSIX segment, spawn by default), and without fcntl, SIGHUP, a signal mask
and fork it takes the Windows path (msvcrt's lock, spawn only, no masks). Every run here is a real
trainer in its own process; its weights must equal a plain Linux run's to the bit, and nothing may
be left in /dev/shm."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATE = ROOT / "tools" / "emulate"
PLATFORMS = ["macos", "windows"]
RUN = ["--workers", "2", "--batch-size", "100", "--limit-train", "600", "--limit-test", "200"]


def env_for(platform: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PARALLEL_NN_EMULATE", "PARALLEL_NN_FAULT")}
    if platform:
        env["PYTHONPATH"] = os.pathsep.join([str(EMULATE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PARALLEL_NN_EMULATE"] = platform
    return env


def cli(platform: str | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parallel_nn", *args], cwd=ROOT, env=env_for(platform),
                          capture_output=True, text=True, timeout=timeout)


def start(platform: str | None, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "parallel_nn", *args], cwd=ROOT, env=env_for(platform),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def shm_entries() -> set[str]:
    return set(glob.glob("/dev/shm/*"))


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = run_dir / "progress.jsonl"
        if progress.exists() and len(progress.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: fewer than {count} steps in {timeout} s")


@pytest.fixture(scope="module")
def linux_run(tiny_data, tmp_path_factory) -> bytes:
    """The weights of the plain Linux run every emulated run must equal."""
    run_dir = tmp_path_factory.mktemp("linux") / "run"
    done = cli(None, *RUN, "--epochs", "2", "--data-dir", str(tiny_data), "--run-dir", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    return (run_dir / "weights.json").read_bytes()


def test_the_emulation_takes_the_capabilities_away():
    probe = ("import os, signal, multiprocessing as mp\n"
             "try:\n    import fcntl; f = True\nexcept ImportError:\n    f = False\n"
             "from parallel_nn import capabilities\nfrom parallel_nn.parallel.local import shm\nfrom parallel_nn.run import rundir\n"
             "print(hasattr(os, 'memfd_create'), f, hasattr(signal, 'SIGHUP'), hasattr(signal, 'pthread_sigmask'),"
             " ','.join(mp.get_all_start_methods()), mp.get_start_method(), shm.KIND, rundir.fcntl is None)")
    seen = {p: subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env_for(p), capture_output=True, text=True,
                              check=True).stdout.split() for p in PLATFORMS}
    assert seen["macos"] == ["False", "True", "True", "True", "fork,spawn,forkserver", "spawn", "posix", "False"]
    assert seen["windows"] == ["False", "False", "False", "False", "spawn", "spawn", "posix", "True"]
    cap = "from parallel_nn import capabilities; from parallel_nn.parallel.local import worker; print(capabilities.SELECT_PIPES)"
    assert [subprocess.run([sys.executable, "-c", cap], cwd=ROOT, env=env_for(p), capture_output=True, text=True,
                           check=True).stdout.strip() for p in PLATFORMS] == ["True", "False"]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_help_lists_the_platforms_start_methods(platform):
    done = cli(platform, "--help")
    assert done.returncode == 0, done.stderr
    assert ("{spawn}" in done.stdout) == (platform == "windows")
    # the workers' reduction waits on pipes with select(), which Windows' takes sockets only
    assert ("--reduce {parent}" in done.stdout) == (platform == "windows")
    refused = cli(platform, "--reduce", "sharded", "--epochs", "1")
    assert (refused.returncode == 2 and "invalid choice" in refused.stderr) == (platform == "windows"), refused.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_training_and_evaluation_equal_linux_to_the_bit_and_leave_nothing(platform, tiny_data, tmp_path, linux_run):
    before = shm_entries()
    run_dir = tmp_path / "run"
    done = cli(platform, *RUN, "--epochs", "2", "--data-dir", str(tiny_data), "--run-dir", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (run_dir / "weights.json").read_bytes() == linux_run
    assert shm_entries() <= before
    evaluated = cli(platform, "evaluate", str(run_dir), "--data-dir", str(tiny_data), "--workers", "2", "--limit-test", "200", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(evaluated.stdout)["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ctrl_c_saves_and_resume_finishes_to_the_bit(platform, tiny_data, tmp_path, linux_run):
    """Ctrl-C reaches the whole group, as a terminal's (or a Windows console's) does: the run saves
    and exits 130, no worker prints a traceback, and --resume ends where the straight run ends."""
    before = shm_entries()
    run_dir = tmp_path / "run"
    proc = start(platform, *RUN, "--epochs", "2", "--data-dir", str(tiny_data), "--run-dir", str(run_dir))
    wait_for_steps(run_dir, 3, proc)
    os.killpg(os.getpgid(proc.pid), signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "--resume" in out
    done = cli(platform, "--resume", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    assert (run_dir / "weights.json").read_bytes() == linux_run
    assert shm_entries() <= before


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_killed_worker_is_replaced_and_the_step_redone_to_the_bit(platform, tiny_data, tmp_path):
    longer = [*RUN, "--limit-train", "1200", "--epochs", "3", "--data-dir", str(tiny_data)]  # 36 steps
    straight = cli(None, *longer, "--run-dir", str(tmp_path / "straight"), "--quiet")
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "run"
    proc = start(platform, *longer, "--run-dir", str(run_dir))
    wait_for_steps(run_dir, 2, proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
    workers[0].kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "restarting the workers" in err, err
    assert (run_dir / "weights.json").read_bytes() == (tmp_path / "straight" / "weights.json").read_bytes()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_run_lock_refuses_a_second_trainer(platform, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(platform, *RUN, "--epochs", "500", "--data-dir", str(tiny_data), "--run-dir", str(run_dir))
    try:
        wait_for_steps(run_dir, 8, proc)  # past the first epoch's checkpoint: a run that --resume could continue
        second = cli(platform, "--resume", str(run_dir))
        assert second.returncode == 1 and "in use by another trainer (pid " in second.stderr, second.stderr
        assert proc.poll() is None
    finally:
        os.killpg(os.getpgid(proc.pid), signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 130
    done = cli(platform, "--resume", str(run_dir), "--epochs", str(len((run_dir / "metrics.jsonl").read_text().splitlines()) + 1),
               "--quiet")
    assert done.returncode == 0, done.stderr  # the lock went with its holder


class FakeTerminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("term, ansi", [("dumb", False), ("xterm-256color", True)])
def test_the_live_line_is_cleared_without_escapes_where_the_terminal_has_none(monkeypatch, term, ansi):
    from parallel_nn.run.progress import Progress

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("TERM", term)
    progress = Progress(quiet=False)
    progress.step(1, 2, 3, 120, 1500, 0.5, 0.73)
    progress.clear()
    assert ("\033" in terminal.text) == ansi
    if not ansi:  # the line is overwritten with as many spaces
        line = terminal.text.split("\r")[1]
        assert terminal.text.endswith("\r" + " " * len(line) + "\r")


def test_a_replace_refused_while_a_reader_holds_the_file_is_retried(monkeypatch, tmp_path):
    """Windows refuses os.replace over a file another process has open (PermissionError): the
    atomic write waits for the reader instead of failing the run."""
    from parallel_nn import atomic

    real, refusals = os.replace, []

    def refusing(src, dst, winerror=32):
        if len(refusals) < 3:
            refusals.append(dst)
            error = PermissionError(13, "The process cannot access the file because it is being used by another process")
            if winerror:
                error.winerror = winerror  # what Windows' errors carry (ERROR_SHARING_VIOLATION)
            raise error
        real(src, dst)

    monkeypatch.setattr(os, "replace", refusing)
    atomic.write_json(tmp_path / "metrics.json", {"epoch": 1})
    assert len(refusals) == 3 and json.loads((tmp_path / "metrics.json").read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    # a POSIX permission error is real: raised at once, not waited on
    refusals.clear()
    monkeypatch.setattr(os, "replace", lambda src, dst: refusing(src, dst, winerror=None))
    started = time.monotonic()
    with pytest.raises(Exception, match="cannot write"):
        atomic.write_json(tmp_path / "metrics.json", {"epoch": 2})
    assert len(refusals) == 1 and time.monotonic() - started < 1
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"epoch": 1}


def test_make_finds_the_interpreters_without_readlink_f(tmp_path):
    """macOS before 12.3 has no `readlink -f`: tools/pythons (what make picks from) must list the
    same interpreters without it."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    (shadow / "readlink").write_text('#!/bin/sh\necho "readlink: illegal option -- f" >&2\nexit 1\n')
    (shadow / "readlink").chmod(0o755)
    listed = subprocess.run([str(ROOT / "tools" / "pythons")], capture_output=True, text=True, check=True).stdout
    without = subprocess.run([str(ROOT / "tools" / "pythons")], capture_output=True, text=True, check=True,
                             env={**os.environ, "PATH": f"{shadow}{os.pathsep}{os.environ['PATH']}"}).stdout
    assert listed and without == listed


def test_a_start_that_fails_for_want_of_shared_memory_writes_nothing(monkeypatch, tiny_data, tmp_path):
    """What a platform without the shared memory the engine asks for used to leave behind (config.json
    and .lock, so the same --run-dir was then refused): now nothing."""
    from parallel_nn.parallel.local import shm
    from parallel_nn.run.train import Config, train

    def no_memory(size):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(shm, "_anonymous", no_memory)
    with pytest.raises(Exception):
        train(Config(workers=2, epochs=1, batch_size=100, data_dir=str(tiny_data), run_dir=str(tmp_path / "run"), quiet=True))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_workers_leave_when_their_trainer_is_killed(platform, tiny_data, tmp_path):
    """Without Linux's PR_SET_PDEATHSIG (the emulated Windows has no prctl): a worker notices that
    its pipe to the trainer has closed (or, on macOS, that its parent is gone) and leaves."""
    run_dir = tmp_path / "run"
    proc = start(platform, *RUN, "--epochs", "500", "--data-dir", str(tiny_data), "--run-dir", str(run_dir))
    wait_for_steps(run_dir, 2, proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(workers) == 1  # 2 workers: the trainer itself and one worker process
    proc.kill()
    proc.communicate(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
