"""The reproduced ways a run got lost, resumed wrong or misread its input: one test each."""

from __future__ import annotations

import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bench import textbook
from parallel_nn import UserError, atomic
from parallel_nn.data import mnist
from parallel_nn.events import Listener
from parallel_nn.nn.network import Model, he_init
from parallel_nn.run import rundir
from parallel_nn.run.checkpoint import load_checkpoint, load_model, save_model
from parallel_nn.run.train import Config, train
from tests.test_faults import ARGS, Trainer
from tests.test_parallel import wait_for_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(data, run_dir, **overrides):
    base = dict(workers=2, epochs=2, batch_size=100, data_dir=str(data), run_dir=str(run_dir), quiet=True)
    base.update(overrides)
    return Config(**base)


def same_weights(a: Path, b: Path) -> bool:
    return (a / "weights.json").read_bytes() == (b / "weights.json").read_bytes()


def test_a_stop_during_evaluation_resumes_bit_identical(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "straight").returncode == 0
    cut = tmp_path / "cut"
    done = trainer.train(cut, fault="evaluate:sigterm:2")  # the group's SIGTERM while epoch 2 is evaluated
    assert done.returncode == 130, done.stderr
    _, checkpoint = load_checkpoint(cut / "checkpoint.json")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)  # every step of epoch 2 done, its evaluation not
    again = trainer.resume(cut)
    assert again.returncode == 0, again.stderr
    assert same_weights(cut, tmp_path / "straight")
    metrics = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[1]["lr"] > 0


def test_closing_the_terminal_saves_and_exits_130(tiny_data, tmp_path):
    """A real pseudo-terminal, closed under a running trainer: SIGHUP, then every write fails (EIO)."""
    master, slave = os.openpty()
    args = ["--workers", "2", "--start-method", "fork", "--batch-size", "50", "--limit-train", "300", "--limit-test", "100", "--epochs", "8",
            "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "run")]

    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 60
    while b"epoch 2/" not in seen and time.monotonic() < deadline:  # the live line of epoch 2: mid-run
        if select.select([master], [], [], 1.0)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    assert b"epoch 2/" in seen, seen[-500:]
    os.close(master)  # the terminal goes away
    assert proc.wait(timeout=60) == 130
    _, checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.json")
    assert checkpoint["epoch"] >= 1
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.resume(tmp_path / "run").returncode == 0
    straight = trainer.run(*args[:-2], "--run-dir", str(tmp_path / "straight"), "--quiet")
    assert straight.returncode == 0, straight.stderr
    assert same_weights(tmp_path / "run", tmp_path / "straight")


def test_a_plain_resume_keeps_the_runs_workers(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "straight", "--workers", "1").returncode == 0
    assert trainer.train(tmp_path / "cut", "--workers", "1", fault="update:sigint:5").returncode == 130
    done = trainer.resume(tmp_path / "cut")  # no --workers: the run's 1, not this machine's count
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["workers"] for m in metrics] == [1, 1, 1]
    assert same_weights(tmp_path / "cut", tmp_path / "straight")


def test_an_exception_in_a_worker_saves_first_and_says_one_line(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    done = trainer.train(tmp_path / "run", fault="compute:raise:5")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: worker 0 failed: RuntimeError: injected fault at compute" or \
        done.stderr.strip() == "error: worker 1 failed: RuntimeError: injected fault at compute", done.stderr
    _, checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.json")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1)  # saved where it stood, not at the epoch before
    debug = trainer.train(tmp_path / "other", "--debug", fault="compute:raise:1")
    assert "in point" in debug.stderr  # --debug shows the worker's own traceback


def test_resume_works_from_any_directory_and_checks_the_data(tiny_data, tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(tiny_data, here / "datasets" / "mnist")
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = [sys.executable, "-m", "parallel_nn", *ARGS, "--run-dir", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(run + ["--epochs", "1"], cwd=here, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # the default, relative --data-dir
    resume = [sys.executable, "-m", "parallel_nn", "--resume", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(resume + ["--epochs", "2"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the data moved: --data-dir may say where it is now; other data is refused
    shutil.move(str(here / "datasets"), str(elsewhere / "moved"))
    done = subprocess.run(resume + ["--epochs", "3", "--data-dir", str(elsewhere / "moved" / "mnist")], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from tests.conftest import write_dataset

    other = write_dataset(tmp_path / "other", 400, 100, seed=7)
    done = subprocess.run(resume + ["--epochs", "4", "--data-dir", str(other)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "not the ones this run was trained on" in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_diverging_run_stops_and_leaves_only_readable_files(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"diverged at epoch 1 step \d+: .*lower --lr"):
        train(config(tiny_data, tmp_path / "run", lr=1e200, optimizer="sgd", lr_schedule="constant"))
    for path in (tmp_path / "run").glob("*.json*"):
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path
    # a run that diverges later keeps its last finite checkpoint, which loads
    with pytest.raises(UserError, match="diverged at epoch 2 step 2"):
        train(config(tiny_data, tmp_path / "later", epochs=2), listeners=[PoisonAfter(1, 1)])
    _, checkpoint = load_checkpoint(tmp_path / "later" / "checkpoint.json")  # epoch 1's, finite
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0)
    load_model(tmp_path / "later" / "weights.json")


class PoisonAfter(Listener):
    """Makes the weights infinite after (epoch, step) (0-based epoch, steps done), as an overflow would."""

    def __init__(self, epoch, step):
        self.after = (epoch, step)

    def step_done(self, run, step):
        if (run.epoch, run.step) > self.after:
            run.update.params = [math.inf] * len(run.params)
            run.engine.set_params(run.update.params)


def test_a_stopped_worker_is_replaced_and_the_run_ends_bit_identical(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "straight").returncode == 0
    started = time.monotonic()
    done = trainer.train(tmp_path / "run", "--worker-timeout", "2", fault="compute:stop:5")  # SIGSTOP, mid-step
    assert done.returncode == 0, done.stderr
    assert "did not answer within 2 s" in done.stderr and "restarting the workers" in done.stderr
    assert time.monotonic() - started < 60
    assert same_weights(tmp_path / "run", tmp_path / "straight")
    assert trainer.survivors() == []


def test_worker_timeout_is_scaled_from_measured_answers():
    from parallel_nn.parallel.base import Watchdog

    dog = Watchdog(floor=60.0, factor=20.0)
    assert dog.limit("grad") == 60.0
    dog.answered("grad", 10.0)
    dog.answered("eval", 0.5)
    assert dog.limit("grad") == 200.0 and dog.limit("eval") == 60.0
    assert Watchdog(fixed=2.0).limit("grad") == 2.0


def test_a_second_ctrl_c_during_a_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_json(tmp_path / "checkpoint.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_the_checkpoint_is_read_under_the_lock(tiny_data, tmp_path, monkeypatch):
    from parallel_nn.run import train as train_module

    train(config(tiny_data, tmp_path / "run", epochs=1))
    holders = []
    real = train_module.load_checkpoint

    def spy(path):
        holders.append(rundir.holder(tmp_path / "run"))
        return real(path)

    monkeypatch.setattr(train_module, "load_checkpoint", spy)
    train(config(tiny_data, None, epochs=2), resume=str(tmp_path / "run"))
    assert holders == [os.getpid()]


def test_a_failed_start_leaves_nothing(tiny_data, tmp_path, monkeypatch):
    from parallel_nn.parallel.local.pool import LocalEngine

    def cannot(self):
        raise UserError("no shared memory here")

    monkeypatch.setattr(LocalEngine, "start", cannot)
    with pytest.raises(UserError, match="no shared memory"):
        train(config(tiny_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError):
        train(config(tiny_data, tmp_path / "kept"))
    assert list((tmp_path / "kept").iterdir()) == []
    monkeypatch.undo()
    train(config(tiny_data, tmp_path / "run", epochs=1))  # the same directory is not refused


def test_the_last_partial_batch_is_the_mean_over_its_real_size(tiny_data, tmp_path):
    """250 examples in batches of 100: the third step averages over 50, not 100."""
    sizes = [784, 32, 32, 10]
    start = Model(sizes, he_init(sizes, 3))
    save_model(tmp_path / "init.json", start)
    lr = 0.1
    train(config(tiny_data, tmp_path / "run", workers=3, epochs=1, optimizer="sgd", lr=lr, lr_schedule="constant",
                 shift=0, shuffle=False, limit_train=250, init=str(tmp_path / "init.json")))
    train_set = mnist.load_split(tiny_data, "train")
    params = list(start.params)
    for a, b in ((0, 100), (100, 200), (200, 250)):
        _, grads = textbook.mean_loss_and_gradient(textbook.unflatten(params, sizes),
                                                   textbook.decode(train_set.images, range(a, b)), list(train_set.labels[a:b]))
        flat = [x for dW, db in grads for x in [v for row in dW for v in row] + db]
        params = [w - lr * g for w, g in zip(params, flat)]
    after = load_model(tmp_path / "run" / "weights.json").params
    assert max(abs(x - y) / max(abs(y), 1e-3) for x, y in zip(after, params)) <= 1e-9


def test_the_shift_draws_every_one_of_the_nine_moves():
    drawn = mnist.random_augment(500, 1, 0, "parallel_nn/shift/0/0/0")
    pairs = {(drawn[3 * n] - 128, drawn[3 * n + 1] - 128) for n in range(500)}
    assert pairs == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}


@pytest.mark.parametrize("name", rundir.RUN_FILES)
def test_any_one_run_file_alone_makes_a_directory_a_run(name, tiny_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_text("{}\n")
    with pytest.raises(UserError, match=f"already holds a run \\({name}\\)"):
        train(config(tiny_data, tmp_path / "run", epochs=1))
    done = Trainer(tmp_path, tiny_data).train(tmp_path / "run")
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == [name]


# ---- found by a review that attacked the fixes above ----


def test_sigkill_to_the_group_under_spawn_with_the_workers_reduction_leaks_nothing(tiny_data, tmp_path):
    """multiprocessing's Barrier would leave four named semaphores in /dev/shm."""
    import signal

    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", "--workers", "2", "--start-method", "spawn",
                             "--reduce", "workers", "--batch-size", "100", "--epochs", "50", "--data-dir", str(tiny_data),
                             "--run-dir", str(tmp_path / "run"), "--quiet"], cwd=ROOT, start_new_session=True)
    wait_for_workers(proc, 2)  # the worker process and spawn's resource tracker
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert Trainer(tmp_path, tiny_data).survivors() == []
    assert set(os.listdir("/dev/shm")) <= before


def test_a_resume_right_after_the_trainer_is_killed_is_not_refused(tiny_data, tmp_path):
    """Forked workers must not share the trainer's lock; a stopped one must not outlive it."""
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "straight").returncode == 0
    assert trainer.train(tmp_path / "run", fault="update:kill:5").returncode == -9
    done = trainer.resume(tmp_path / "run")  # at once: no waiting for the workers to notice
    assert done.returncode == 0, done.stderr
    assert same_weights(tmp_path / "run", tmp_path / "straight")


def test_a_stopped_worker_then_a_killed_trainer_leaves_no_orphan(tiny_data, tmp_path):
    import psutil

    env = dict(os.environ, PARALLEL_NN_FAULT="compute:stop:5", PARALLEL_NN_FAULT_ONCE=str(tmp_path / "fired"))
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", *ARGS, "--data-dir", str(tiny_data), "--run-dir",
                             str(tmp_path / "run"), "--quiet"], cwd=ROOT, start_new_session=True, env=env)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and not any(w.status() == psutil.STATUS_STOPPED for w in workers):
        time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
    proc.kill()  # the trainer dies while one of its workers is stopped (epoch 2: a checkpoint exists)
    proc.wait(timeout=10)
    time.sleep(0.5)
    for w in workers:
        assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE
    done = Trainer(tmp_path, tiny_data).resume(tmp_path / "run")
    assert done.returncode == 0, done.stderr


def test_a_hangup_under_spawn_prints_no_traceback(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    done = trainer.train(tmp_path / "run", "--start-method", "spawn", "--reduce", "workers", fault="update:sighup:5")
    assert done.returncode == 130
    assert "Traceback" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr


def test_ctrl_c_with_a_stopped_worker_stops_within_seconds(tiny_data, tmp_path):
    import signal

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", *ARGS, "--epochs", "50", "--data-dir", str(tiny_data),
                             "--run-dir", str(tmp_path / "run")], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_workers(proc, 1)  # 2 workers: the trainer and one worker process
    time.sleep(1.0)
    os.kill(psutil.Process(proc.pid).children()[0].pid, signal.SIGSTOP)
    time.sleep(0.3)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130 and "interrupted: saved" in out, err
    assert Trainer(tmp_path, tiny_data).survivors() == []
    assert Trainer(tmp_path, tiny_data).resume(tmp_path / "run", "--epochs", "4").returncode == 0


def test_a_signal_while_starting_ends_in_a_resumable_checkpoint(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "straight").returncode == 0
    done = trainer.train(tmp_path / "run", fault="start:sigterm:1")  # before the data is even loaded
    assert done.returncode == 130, done.stderr
    assert trainer.resume(tmp_path / "run").returncode == 0
    assert same_weights(tmp_path / "run", tmp_path / "straight")


def test_a_relative_data_dir_given_on_resume_is_stored_absolute(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    shutil.copytree(tiny_data, tmp_path / "d1")
    run = [sys.executable, "-m", "parallel_nn", *ARGS, "--run-dir", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=ROOT, PARALLEL_NN_FAULT="update:sigint:2")
    assert subprocess.run(run + ["--data-dir", "d1"], cwd=tmp_path, env=env, capture_output=True,
                          timeout=120).returncode == 130
    shutil.move(str(tmp_path / "d1"), str(tmp_path / "d2"))
    env["PARALLEL_NN_FAULT"] = "update:sigint:1"
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "--resume", "run", "--data-dir", "d2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "d2")
    assert trainer.resume(tmp_path / "run").returncode == 0  # from elsewhere, no --data-dir


def test_an_explicit_flag_equal_to_the_default_is_honoured_on_resume(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "run", "--reduce", "workers", fault="update:sigint:2").returncode == 130
    done = trainer.resume(tmp_path / "run", "--reduce", "parent")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reduce"] == "parent"


def test_a_failed_overwrite_keeps_the_old_run(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "run", "--epochs", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != ".lock"}
    done = trainer.run(*ARGS, "--data-dir", str(tmp_path / "typo"), "--run-dir", str(tmp_path / "run"), "--overwrite")
    assert done.returncode == 1 and "is missing" in done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(step=1000), "step 1000 is past the end of an epoch"),
    (lambda c: c.update(step=-5), "epoch and step must be whole numbers"),
    (lambda c: c["partial"].update(loss=float("nan")), "partial must hold finite loss"),
    (lambda c: c.update(epoch="2"), "epoch and step must be whole numbers"),
    (lambda c: c["config"].update(batch_size="x"), "config: batch_size out of range"),
    (lambda c: c["optimizer"]["v"].__setitem__(0, "x"), "optimizer 'v' must be"),
    (lambda c: c["config"].update(optimizer="adam"), "optimizer state lacks ['m', 's'] for its optimizer adam"),
    (lambda c: c.update(optimizer={}), "optimizer state lacks ['t', 'v'] for its optimizer nesterov"),
    (lambda c: c["config"].update(reduce="bogus"), "config: reduce out of range"),
    (lambda c: c["config"].update(start_method="bogus"), "config: start_method out of range"),
    (lambda c: c["config"].update(backend="bogus"), "config: backend out of range"),
    (lambda c: c["partial"].update(seen=0, correct=0), "partial: 0 examples seen and 0 correct cannot follow 2 steps"),
    (lambda c: c["optimizer"].update(v=3.0), "optimizer state 'v' must be a list"),
    (lambda c: c["optimizer"].update(t=[0.0] * len(c["optimizer"]["v"])), "optimizer state 't' must be a number"),
    (lambda c: c["optimizer"].update(t=-1), "optimizer state 't' must be a whole number of steps"),
    (lambda c: c["config"].update(hidden=[16]), "config: hidden [16] but weights of layer sizes [784, 32, 32, 10]"),
    (lambda c: c["config"].update(workers=1000), "config: workers 1000 is more than its batch_size 100"),
    (lambda c: c.update(data_sha256=5), "data_sha256 must be 64 hexadecimal digits"),
    (lambda c: c["optimizer"].update(t=10**400), "optimizer 't' must be a finite number"),
])
def test_an_edited_checkpoint_is_one_line_naming_the_file(edit, message, tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "run", fault="update:sigint:2").returncode == 130
    path = tmp_path / "run" / "checkpoint.json"
    checkpoint = json.loads(path.read_text())
    edit(checkpoint)
    path.write_text(json.dumps(checkpoint))
    done = trainer.resume(tmp_path / "run")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert str(path) in done.stderr and message in done.stderr, done.stderr


def test_closed_output_descriptors_do_not_stop_a_run(tiny_data, tmp_path):
    for closed in ("1", "2"):
        done = subprocess.run(f"{sys.executable} -m parallel_nn {' '.join(ARGS)} --data-dir {tiny_data} "
                              f"--run-dir {tmp_path / closed} {closed}>&-", shell=True, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / closed / "weights.json").exists()


def test_an_unwritable_run_directory_is_one_line(tiny_data, tmp_path):
    (tmp_path / "file").write_text("")
    done = Trainer(tmp_path, tiny_data).train(tmp_path / "file" / "run")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "choose a writable --run-dir" in done.stderr


class Raises(Listener):
    """A listener with a bug: it raises after (epoch, step) (0-based epoch, steps done)."""

    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def step_done(self, run, step):
        if (run.epoch, run.step) == self.at:
            raise RuntimeError("a listener's bug")


def test_a_listener_that_raises_fails_the_run_without_losing_it(tiny_data, tmp_path):
    train(config(tiny_data, tmp_path / "straight", epochs=2))
    with pytest.raises(RuntimeError, match="a listener's bug"):
        train(config(tiny_data, tmp_path / "run", epochs=2), listeners=[Raises(0, 2)])
    _, checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.json")
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 2)  # saved where it stood
    train(config(tiny_data, None, epochs=2), resume=str(tmp_path / "run"))
    assert (tmp_path / "run" / "weights.json").read_bytes() == (tmp_path / "straight" / "weights.json").read_bytes()


def test_a_sharded_run_resumed_on_ray_is_refused_in_one_line(tiny_data, tmp_path):
    """--backend ray refuses a workers' reduction; on --resume one of the two may be the saved run's."""
    train(config(tiny_data, tmp_path / "run", epochs=1, reduce="sharded"))
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "--resume", str(tmp_path / "run"), "--epochs", "2",
                           "--backend", "ray"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "--reduce parent" in done.stderr


# ---- found by a second review: nothing written outside the run, errors that name the file ----


def test_a_link_among_a_run_directorys_files_is_refused_and_nothing_is_written_through_it(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the trainer's\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / rundir.LOCK_NAME).symlink_to(outside)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "progress.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # dangling
    assert trainer.train(tmp_path / "done").returncode == 0
    (tmp_path / "done" / "progress.jsonl").unlink()
    (tmp_path / "done" / "progress.jsonl").symlink_to(outside)
    for done in (trainer.train(tmp_path / "a"), trainer.train(tmp_path / "b"), trainer.train(tmp_path / "b", "--overwrite"),
                 trainer.resume(tmp_path / "done", "--epochs", "4")):
        assert done.returncode in (1, 2) and "is a symbolic link" in done.stderr.splitlines()[-1], done.stderr
    assert outside.read_text() == "not the trainer's\n" and not (tmp_path / "nowhere.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [rundir.LOCK_NAME]


def test_a_hidden_layer_too_big_for_the_memory_is_refused_up_front(tiny_data, tmp_path):
    for hidden in ("99999999999", "100000,100000"):
        done = Trainer(tmp_path, tiny_data).train(tmp_path / "run", "--hidden", hidden)
        assert done.returncode == 2 and "GiB is available" in done.stderr.splitlines()[-1], done.stderr
    assert not (tmp_path / "run").exists()


def test_a_trace_is_never_written_over_a_run_file_the_data_or_a_file_that_is_not_a_trace(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "run", "--epochs", "1").returncode == 0
    (tmp_path / "notes.json").write_text("[1, 2]\n")
    targets = [tmp_path / "run" / "checkpoint.json", tmp_path / "run" / "weights.json", tmp_path / "notes.json",
               next(Path(tiny_data).iterdir())]
    before = {t: t.read_bytes() for t in targets}
    for target in targets:
        done = trainer.resume(tmp_path / "run", "--epochs", "2", "--trace", str(target))
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and "which the trace would replace" in done.stderr
    assert {t: t.read_bytes() for t in targets} == before
    assert trainer.resume(tmp_path / "run", "--epochs", "2", "--trace", str(tmp_path / "trace.json")).returncode == 0
    again = trainer.train(tmp_path / "again", "--epochs", "1", "--trace", str(tmp_path / "trace.json"))  # a trace: replaced
    assert again.returncode == 0, again.stderr


def test_evaluate_on_a_file_that_is_not_weights_or_not_for_mnist_is_one_line(tiny_data, tmp_path):
    (tmp_path / "random.json").write_bytes(bytes(range(256)) * 8)
    save_model(tmp_path / "five.json", Model([784, 5], he_init([784, 5], 0)))
    for name, message in (("random.json", "not a text file"), ("five.json", "gives 10 outputs")):
        done = subprocess.run([sys.executable, "-m", "parallel_nn", "evaluate", str(tmp_path / name), "--data-dir",
                               str(tiny_data), "--workers", "2"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert str(tmp_path / name) in done.stderr and message in done.stderr


def test_a_file_size_limit_below_the_shared_memory_is_one_line_that_says_so(tiny_data, tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, resource.RLIM_INFINITY))

    done = subprocess.run([sys.executable, "-m", "parallel_nn", *ARGS, "--data-dir", str(tiny_data), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "ulimit -f 100" in done.stderr and "shared memory" in done.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_fixed_setting_even_at_its_default_and_workers_beyond_the_batch(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    assert trainer.train(tmp_path / "run", "--epochs", "1").returncode == 0  # --batch-size 100
    for flags in (["--hidden", "32,32"], ["--batch-size", "500"], ["--seed", "0"], ["--no-shuffle"]):  # all but the last their default
        done = trainer.resume(tmp_path / "run", "--epochs", "2", *flags)
        assert done.returncode == 2 and f"{flags[0]} cannot change" in done.stderr, done.stderr
    done = trainer.resume(tmp_path / "run", "--epochs", "2", "--workers", "101")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "--batch-size 100" in done.stderr, done.stderr

    from parallel_nn.cli import parse

    parse(["--resume", str(tmp_path / "run"), "--workers", "600"])  # checked against the run's batch, not the default 500
    assert parse(["--batch-size", "1"])[1].workers == 1  # the default worker count fits the batch given

def test_hard_links_in_a_run_directory_write_nothing_into_the_other_name(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    (tmp_path / "new").mkdir()
    os.link(outside, tmp_path / "new" / rundir.LOCK_NAME)
    done = trainer.train(tmp_path / "new")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "has 2 names (a hard link)" in done.stderr
    assert outside.read_text() == "keep me\n"
    assert trainer.train(tmp_path / "run", "--epochs", "1").returncode == 0
    (tmp_path / "copy").mkdir()  # a snapshot made of hard links (cp -al, rsync --link-dest), then resumed
    for name in rundir.RUN_FILES:
        os.link(tmp_path / "run" / name, tmp_path / "copy" / name)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in rundir.RUN_FILES}
    done = trainer.resume(tmp_path / "copy", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert {name: (tmp_path / "run" / name).read_bytes() for name in rundir.RUN_FILES} == before
    assert len((tmp_path / "copy" / "progress.jsonl").read_text().splitlines()) == 6  # 3 steps an epoch


def test_fifos_where_the_trainer_reads_are_refused_not_waited_on(tiny_data, tmp_path):
    trainer = Trainer(tmp_path, tiny_data)
    os.mkfifo(tmp_path / "init.json")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    fifo_data = tmp_path / "fifo-data"
    shutil.copytree(tiny_data, fifo_data)
    first = sorted(fifo_data.iterdir())[0]
    first.unlink()
    os.mkfifo(first)
    (tmp_path / "locked").mkdir()
    os.mkfifo(tmp_path / "locked" / rundir.LOCK_NAME)
    (tmp_path / "fifo-run").mkdir()
    os.mkfifo(tmp_path / "fifo-run" / "checkpoint.json")
    done = trainer.resume(tmp_path / "fifo-run")
    assert done.returncode == 1 and "checkpoint.json is not a regular file" in done.stderr, done.stderr
    for done, message in ((trainer.train(tmp_path / "a", "--init", str(tmp_path / "init.json")), "init.json: cannot read it"),
                          (trainer.run(*ARGS, "--data-dir", str(fifo_data), "--run-dir", str(tmp_path / "b"), timeout=60),
                           first.name),
                          (trainer.train(tmp_path / "locked"), "is not a regular file")):
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert trainer.train(tmp_path / "run", "--epochs", "1").returncode == 0
    (tmp_path / "run" / "progress.jsonl").unlink()
    os.mkfifo(tmp_path / "run" / "progress.jsonl")
    done = trainer.resume(tmp_path / "run", "--epochs", "2")  # the step log gives up with a warning; training goes on
    assert done.returncode == 0 and "progress.jsonl" in done.stderr, done.stderr


def test_json_nested_too_deeply_is_one_line(tiny_data, tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000)
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "evaluate", str(tmp_path / "deep.json"), "--data-dir",
                           str(tiny_data)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "nested too deeply" in done.stderr, done.stderr


def test_the_trainer_reads_back_its_own_progress_file_whatever_its_size(tmp_path, monkeypatch):
    """A resume cuts progress.jsonl back to its checkpoint; the server's read limit is not the trainer's."""
    from parallel_nn import files
    from parallel_nn.run import steplog

    path = tmp_path / "progress.jsonl"
    path.write_text("".join(json.dumps({"i": i, "loss": 1.0}) + "\n" for i in range(100)))
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 100)  # far below the file
    steplog.cut_back(path, 40)
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == list(range(40))
