"""The engine: exact for any worker count and start method, and it never hangs, leaks or orphans."""

import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from parallel_nn import faults
from parallel_nn.__main__ import pypy_settings
from parallel_nn.data import mnist
from parallel_nn.events import Listener
from parallel_nn.nn.network import he_init
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.base import WorkerCrashed
from parallel_nn.parallel.local.pool import LocalEngine as Engine
from parallel_nn.parallel.shards import shard
from parallel_nn.run.train import Config, train

SIZES = [784, 32, 32, 10]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_segments():
    return set(glob.glob("/dev/shm/psm_*"))


def test_shards_are_contiguous_and_balanced():
    pieces = shard(range(500), 8)
    assert [len(p) for p in pieces] == [63, 63, 63, 63, 62, 62, 62, 62]
    assert sum(pieces, []) == list(range(500))
    assert shard([1, 2], 3) == [[1], [2], []]


def trajectory(splits, workers, method, steps=3, batch=250):
    """Weights after a few SGD steps on batches that 3 and 8 do not divide."""
    train_set, test_set = splits
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with Engine(SIZES, train_set, test_set, workers, method) as engine:
        for step in range(steps):
            engine.set_params(params)
            grad, loss, correct = engine.gradient(range(step * batch, (step + 1) * batch))
            params = optimizer.step(params, [g / batch for g in grad], 0.1)
        engine.set_params(params)
        test_loss, predictions = engine.evaluate()
    return params, test_loss, predictions


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_same_trajectory_for_1_2_3_8_workers(tiny_splits, method):
    before = shm_segments()
    reference, ref_loss, ref_predictions = trajectory(tiny_splits, 1, "fork")
    for workers in (1, 2, 3, 8):
        params, test_loss, predictions = trajectory(tiny_splits, workers, method)
        worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(params, reference))
        assert worst <= 1e-9, (workers, method, worst)
        assert test_loss == pytest.approx(ref_loss, rel=1e-9) and predictions == ref_predictions
    assert shm_segments() <= before  # everything created was unlinked


def long_step(engine) -> list[int]:
    """A batch whose step takes >= 0.4 s on this interpreter, measured on that batch itself (PyPy's
    JIT runs 1,200 examples in a few ms once warm), so that a kill 0.1 s in lands mid-step."""
    batch = list(range(1200))
    while True:
        started = time.perf_counter()
        engine.gradient(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.4:
            return batch
        batch = batch * max(2, math.ceil(0.5 / elapsed))


def test_a_killed_worker_is_replaced_and_the_step_redone(tiny_splits):
    train_set, test_set = tiny_splits
    warnings = []
    with Engine(SIZES, train_set, test_set, 2, "fork", warn=warnings.append) as engine:
        engine.set_params(he_init(SIZES, 0))
        batch = long_step(engine)
        expected = engine.gradient(batch)
        victim = engine.worker_pids()[0]
        threading.Timer(0.1, os.kill, (victim, signal.SIGKILL)).start()
        got = engine.gradient(batch)
        assert engine.restarts == 1 and victim not in engine.worker_pids()
        assert got == expected  # the step was redone from the same weights: identical
        assert "died: killed by signal 9" in warnings[0]
        workers = engine.worker_pids()
    time.sleep(0.1)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)


def test_workers_that_keep_dying_stop_the_run_with_a_resumable_checkpoint(tiny_data, tmp_path, monkeypatch):
    """From step 3 on, the worker is killed, and every worker started to replace it kills itself at
    its first computation (a fault forked into it): a worker that dies however often it is restarted.
    Deterministic: a killer polling from outside loses the race to a warm worker's 2 ms step."""
    before = shm_segments()
    base = dict(workers=2, epochs=1, batch_size=100, data_dir=str(tiny_data), quiet=True, start_method="fork")

    def start_killing(epoch, step):
        if step == 3 and faults.FAULT != "kill":
            for name, value in (("PHASE", "compute"), ("FAULT", "kill"), ("AT", "1")):
                monkeypatch.setattr(faults, name, value)  # what the workers forked from now on inherit
            for child in psutil.Process().children():
                if "resource_tracker" not in " ".join(child.cmdline()):  # the tracker is no worker
                    child.kill()

    with pytest.raises(WorkerCrashed, match="gave up after 3 restarts"):
        train(Config(run_dir=str(tmp_path / "crash"), **base), on_step=start_killing)
    monkeypatch.undo()
    assert shm_segments() <= before
    train(Config(**base), resume=str(tmp_path / "crash"))
    train(Config(run_dir=str(tmp_path / "straight"), **base))
    from parallel_nn.run.checkpoint import load_model
    assert load_model(tmp_path / "crash").params == load_model(tmp_path / "straight").params


def start_cli(tmp_path, data, *extra):
    return subprocess.Popen([sys.executable, "-m", "parallel_nn", "--workers", "3", "--epochs", "50", "--batch-size", "60",
                             "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_workers(proc, count, timeout=30):
    """Wait until the trainer `proc` has `count` child processes (with W workers it starts W - 1:
    worker 0 is the trainer itself), counting a start method's helper process too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(psutil.Process(proc.pid).children(recursive=True)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("workers did not start")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_to_the_process_group_saves_and_exits_130(tiny_data, tmp_path, method):
    before = shm_segments()
    proc = start_cli(tmp_path, tiny_data, "--start-method", method)
    wait_for_workers(proc, 2)
    time.sleep(1.5)
    pgid = os.getpgid(proc.pid)
    sent = time.monotonic()
    os.killpg(pgid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130, err
    assert "interrupted: saved" in out and "--resume" in out
    assert "resource_tracker" not in err and "Traceback" not in err
    assert (tmp_path / "run" / "checkpoint.json").exists()
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["pid"]) if _in_group(p, pgid)]
    assert shm_segments() <= before
    # and the printed --resume command finishes the run (here cut short to one more epoch)
    from parallel_nn.run.checkpoint import load_checkpoint
    epoch = load_checkpoint(tmp_path / "run" / "checkpoint.json")[1]["epoch"]
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "--resume", str(tmp_path / "run"), "--epochs", str(epoch + 1),
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == epoch + 1


def _in_group(p, pgid):
    try:
        return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.Error):
        return False


@pytest.mark.parametrize("method,reduce", [("fork", "parent"), ("forkserver", "parent"), ("fork", "sharded"),
                                           ("forkserver", "sharded")])
def test_a_killed_trainer_leaves_no_orphans(tiny_data, tmp_path, method, reduce):
    """Also with a workers' reduction, whose barrier waits for the trainer (its party 0): under
    forkserver a worker's parent is the forkserver, which outlives a killed trainer while the
    workers hold its pipe, so they must watch the trainer itself."""
    proc = start_cli(tmp_path, tiny_data, "--start-method", method, "--reduce", reduce, "--batch-size", "600")
    wait_for_workers(proc, 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "run" / "progress.jsonl").exists():
        time.sleep(0.01)  # steps are under way: the workers meet at barriers now
    time.sleep(0.2)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.kill()
    proc.communicate(timeout=10)
    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    # the 2 worker processes of 3 workers, plus the forkserver or resource tracker where the start method has one
    assert len(workers) >= 2 and not any(map(alive, workers))


def test_real_data_process_tree_memory_with_8_workers(real_data):
    """Measured in a fresh interpreter, as the trainer runs (on PyPy with the trainer's young
    generation: it sets the size of the heap), over an epoch of steps, for the heaps to settle: the
    pytest process itself (and whatever other tests imported into it) would be shared into forked
    workers and counted too."""
    script = f"""
import os, psutil
from parallel_nn import faults
from parallel_nn.data import mnist
from parallel_nn.nn.network import he_init
from parallel_nn.parallel.local.pool import LocalEngine as Engine
if __name__ == "__main__":
    train_set, test_set = mnist.load({str(real_data)!r})
    engine = Engine({SIZES}, train_set, test_set, 8)
    del train_set, test_set
    with engine:
        engine.set_params(he_init({SIZES}, 0))
        for step in range(120):
            engine.gradient(range(step * 500, (step + 1) * 500))
        engine.evaluate()
        print(sum(psutil.Process(p).memory_full_info().pss for p in [os.getpid(), *engine.worker_pids()]))
"""
    env = {**pypy_settings(), **os.environ}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    megabytes = int(done.stdout.split()[-1]) / 2**20
    # PyPy's runtime (JIT, its own GC nursery) costs ~40 MB more per process than CPython; the
    # interpreter issue's bound for it is 1 GB at 8 workers.
    bound = 1024 if platform.python_implementation() == "PyPy" else 250
    assert megabytes < bound, f"{megabytes:.0f} MB"


def test_augmented_steps_are_the_same_for_any_worker_count(tiny_splits):
    train_set, test_set = tiny_splits
    shifts = mnist.random_augment(250, 2, 10, "x")
    grads = []
    for workers in (1, 3):
        with Engine(SIZES, train_set, test_set, workers, "fork") as engine:
            engine.set_params(he_init(SIZES, 0))
            grads.append(engine.gradient(range(250), shifts))
            plain = engine.gradient(range(250))
    assert max(abs(a - b) for a, b in zip(grads[0][0], grads[1][0])) <= 1e-9 * max(map(abs, grads[0][0]))
    assert grads[0][1] != plain[1]  # the shifts changed what was computed


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_reduction_is_bit_identical_to_the_parents(tiny_splits, method):
    train_set, test_set = tiny_splits
    results = {}
    for reduce in ("parent", "workers"):
        params = he_init(SIZES, 0)
        optimizer = Optimizer("momentum", len(params))
        with Engine(SIZES, train_set, test_set, 3, method, reduce=reduce) as engine:
            for step in range(3):
                engine.set_params(params)
                grad, loss, correct = engine.gradient(range(step * 250, (step + 1) * 250))
                params = optimizer.step(params, [g / 250 for g in grad], 0.1)
            tail = engine.gradient(range(2))  # fewer examples than workers: one worker adds zeros
        results[reduce] = (params, loss, correct, tail)
    assert results["parent"] == results["workers"]


@pytest.mark.parametrize("odd", [math.nan, 2.0**1000, 1e-310])
def test_first_layer_weights_lanes_cannot_hold_give_the_parents_gradient(tiny_splits, odd):
    """On CPython the workers' reduction shares the packing of the first layer (worker.share_lanes):
    weights that lanes cannot hold make every worker fall back to floats alike, as one process does."""
    train_set, test_set = tiny_splits
    params = he_init(SIZES, 0)
    params[5 * 784 + 300] = odd  # row 5 of the first layer; 1e-310: a row too small to scale
    if odd == 1e-310:
        params[5 * 784 : 6 * 784] = [1e-310] * 784
    results = {}
    for reduce in ("parent", "workers"):
        with Engine(SIZES, train_set, test_set, 3, "fork", reduce=reduce) as engine:
            engine.set_params(params)
            results[reduce] = repr(engine.gradient(range(250)))  # repr: nan == nan
    assert results["parent"] == results["workers"]


def test_a_killed_worker_mid_reduction_is_recovered(tiny_splits):
    train_set, test_set = tiny_splits
    with Engine(SIZES, train_set, test_set, 3, "fork", warn=lambda m: None, reduce="workers") as engine:
        engine.set_params(he_init(SIZES, 0))
        batch = long_step(engine)
        expected = engine.gradient(batch)
        threading.Timer(0.1, os.kill, (engine.worker_pids()[1], signal.SIGKILL)).start()
        assert engine.gradient(batch) == expected and engine.restarts == 1


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_idle_workers_stay_alive(tiny_splits, method):
    """Workers check every second that their parent lives; under forkserver that parent is the server."""
    train_set, test_set = tiny_splits
    with Engine(SIZES, train_set, test_set, 2, method) as engine:
        engine.set_params(he_init(SIZES, 0))
        engine.gradient(range(10))
        time.sleep(1.5)  # past at least one of the workers' 1-second checks
        engine.gradient(range(10))
        assert engine.restarts == 0


@pytest.mark.parametrize("optimizer, weight_decay, workers", [("sgd", 0.0, 3), ("nesterov", 1e-3, 3), ("adam", 1e-3, 3),
                                                               ("momentum", 0.0, 8)])
def test_sharded_updates_are_bit_identical_to_the_parents(tiny_data, tmp_path, optimizer, weight_decay, workers):
    """--reduce sharded: every worker updates its own slice of the weights and of the optimizer's
    state; the weights, the state and every metric but the timings equal the default mode's."""
    runs = {}
    for reduce in ("parent", "sharded"):
        run_dir = tmp_path / reduce
        history = train(Config(workers=workers, epochs=2, batch_size=100, optimizer=optimizer, weight_decay=weight_decay,
                               rotate=5, reduce=reduce, data_dir=str(tiny_data), run_dir=str(run_dir), quiet=True))
        checkpoint = json.loads((run_dir / "checkpoint.json").read_text())
        runs[reduce] = ((run_dir / "weights.json").read_bytes(), checkpoint["optimizer"],
                        [(m["train_loss"], m["test_loss"], m["test_accuracy"]) for m in history])
    assert runs["parent"] == runs["sharded"]


def test_sharded_updates_survive_a_killed_worker_and_resume_across_modes(tiny_data, tmp_path, capfd):
    """A killed worker is replaced and the step redone from the buffer that still holds the weights;
    a run stopped in one mode resumes in another, all to the bit."""
    base = dict(workers=2, epochs=2, batch_size=100, data_dir=str(tiny_data), quiet=True)
    train(Config(run_dir=str(tmp_path / "straight"), **base))

    class KillOne(Listener):  # a worker, after the 3rd step (mid-step kills: tests/test_faults.py, sharded cases)
        def step_done(self, run, step):
            if (step.epoch, step.step) == (1, 3):
                os.kill(run.engine.worker_pids()[0], signal.SIGKILL)

    train(Config(run_dir=str(tmp_path / "killed"), reduce="sharded", **{**base, "epochs": 1}), listeners=[KillOne()])
    assert "restarting the workers and redoing the step" in capfd.readouterr().err
    train(Config(run_dir=None, **{**base, "reduce": "sharded"}), resume=str(tmp_path / "killed"))  # epoch 2 sharded
    train(Config(run_dir=str(tmp_path / "half"), reduce="sharded", **{**base, "epochs": 1}))
    train(Config(run_dir=None, **base), resume=str(tmp_path / "half"))  # epoch 2 with the parent updating
    straight = (tmp_path / "straight" / "weights.json").read_bytes()
    assert (tmp_path / "killed" / "weights.json").read_bytes() == straight
    assert (tmp_path / "half" / "weights.json").read_bytes() == straight


def test_a_diverging_sharded_run_keeps_its_last_finite_weights(tiny_data, tmp_path):
    from parallel_nn import UserError

    with pytest.raises(UserError, match="diverged"):
        train(Config(workers=2, epochs=2, batch_size=100, lr=1e200, optimizer="sgd", lr_schedule="constant",
                     reduce="sharded", data_dir=str(tiny_data), run_dir=str(tmp_path / "run"), quiet=True))
    for path in (tmp_path / "run").glob("*.json*"):
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


@pytest.mark.parametrize("reduce", ["workers", "sharded"])
def test_a_long_worker_error_is_reported_at_once_in_broadcast_mode(tiny_splits, monkeypatch, reduce):
    """A traceback larger than a pipe's buffer must not stall the worker that sends it: the parent
    hears of the failure on the bell and reads it (the forked workers inherit the patched hook)."""
    from parallel_nn import faults
    from parallel_nn.parallel.base import Watchdog, WorkerError

    def fail(phase):
        if phase == "compute":
            raise RuntimeError("x" * 1_000_000)

    monkeypatch.setattr(faults, "point", fail)
    train_set, test_set = tiny_splits
    with Engine(SIZES, train_set, test_set, 2, "fork", reduce=reduce) as engine:
        engine.watchdog = Watchdog(30.0)
        engine.set_params(he_init(SIZES, 0))
        started = time.monotonic()
        with pytest.raises(WorkerError, match="RuntimeError: xxx"):
            engine.gradient(range(100))
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("reduce", ["parent", "workers", "sharded"])
def test_each_reduce_mode_makes_what_it_needs_and_no_more(tiny_splits, reduce):
    """modes.py says what a mode needs; the pool makes exactly that, and a step goes out posted in
    the mailbox exactly when the workers add up (untraced), piped otherwise; evaluations are piped."""
    from parallel_nn.parallel.local.modes import MODES

    mode = MODES[reduce]
    train_set, test_set = tiny_splits
    with Engine(SIZES, train_set, test_set, 2, "fork", reduce=reduce) as engine:
        engine.set_params(he_init(SIZES, 0))
        made = set(engine.pool.segments)
        wanted = {"params", "slots", "data"} | {name for name, needed in [("reduced", mode.reduced), ("mailbox", mode.workers_add),
                                                                            ("state", mode.workers_update)] if needed}
        assert made - {"lanes"} == wanted
        assert {"parent": {"params", "slots", "data"}, "workers": {"params", "slots", "data", "reduced", "mailbox"},
                "sharded": {"params", "slots", "data", "mailbox", "state"}}[reduce] == wanted
        assert len(engine.pool.weights) == mode.buffers == (2 if reduce == "sharded" else 1)
        if reduce == "sharded":
            engine.set_state("sgd", {})
            engine.step(range(50), None, 0.1, 1 / 50, 1, ("sgd", 0.0, 0.0))
        else:
            engine.gradient(range(50))
        assert engine.exchange.transport is (engine.exchange.posted if mode.workers_add else engine.exchange.piped)
        engine.evaluate()
        assert engine.exchange.transport is engine.exchange.piped


def test_a_worker_s_answer_is_packed_and_read_back_whole():
    from parallel_nn.parallel.local.mailbox import decode_reply, encode_error, encode_reply
    assert decode_reply(encode_reply(12.5, 431, [])) == ("ok", 12.5, 431, [])
    predictions = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert decode_reply(encode_reply(3.25, predictions, [])) == ("ok", 3.25, predictions, [])
    assert decode_reply(encode_reply(1.0, [], [])) == ("ok", 1.0, [], [])  # an empty share of an evaluation
    spans = [("decode", 1_000, 2_000), ("forward", 2_000, 5_000)]
    assert decode_reply(encode_reply(0.5, 3, spans)) == ("ok", 0.5, 3, spans)
    assert decode_reply(encode_reply(0.5, predictions, spans)) == ("ok", 0.5, predictions, spans)
    assert decode_reply(encode_error("Traceback: é\n")) == ("error", "Traceback: é\n")
    assert len(encode_reply(12.5, 431, [])) < 40  # a step's answer, untraced: no pickle


def test_the_trainer_s_poll_sees_what_wait_sees():
    from multiprocessing import Pipe
    from multiprocessing.connection import wait
    from parallel_nn.capabilities import readable
    quiet, loud = Pipe()
    reader, writer = os.pipe()
    try:
        assert readable([quiet, reader], 0.01) == [] == wait([quiet, reader], 0.01)
        started = time.perf_counter()
        assert readable([quiet], 0.0004) == []  # under a millisecond still waits (PyPy's poll truncates)
        assert time.perf_counter() - started >= 0.0004
        loud.send_bytes(b"x")
        assert readable([quiet, reader], 0.01) == [quiet] == wait([quiet, reader], 0.01)
        os.close(writer)  # a closed other end (a dead worker's sentinel) reads as ready
        writer = None
        assert set(readable([quiet, reader], 0.01)) == {quiet, reader} == set(wait([quiet, reader], 0.01))
    finally:
        os.close(reader)
        if writer is not None:
            os.close(writer)
