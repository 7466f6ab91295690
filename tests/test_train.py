"""End to end through the engine: learning, the exact SGD step, run files, resume, evaluate, the CLI."""

import json
import os
import subprocess
import sys

import pytest

from bench import textbook
from parallel_nn import UserError
from parallel_nn.data import mnist
from parallel_nn.nn.network import Model, he_init
from parallel_nn.run.checkpoint import load_checkpoint, load_model, save_model
from parallel_nn.run.train import Config, evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(data, run_dir, **overrides):
    base = dict(workers=2, epochs=2, batch_size=100, data_dir=str(data), run_dir=str(run_dir), quiet=True)
    base.update(overrides)
    return Config(**base)


def test_learns_the_synthetic_digits_and_writes_the_run_directory(tiny_data, tmp_path):
    history = train(config(tiny_data, tmp_path / "run", epochs=3))
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["test_accuracy"] >= 0.95  # random guessing is 0.10
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [".lock", "checkpoint.json", "config.json", "metrics.jsonl", "progress.jsonl", "weights.json"]  # .lock: see rundir.py
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    for key in ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
                "examples_per_second", "workers", "peak_rss_mb", "serial_ms_per_step", "python", "backend", "nodes",
                "bytes_sent_per_step", "bytes_received_per_step"):
        assert key in lines[0]
    weights = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert weights["format"] == "parallel_nn.weights/1" and weights["layer_sizes"] == [784, 32, 32, 10]
    assert len(weights["layers"][0]["W"]) == 32 and len(weights["layers"][0]["W"][0]) == 784
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] is None and saved["python"] == lines[0]["python"] and lines[0]["backend"] == "local"
    assert lines[0]["nodes"] == 1 and lines[0]["bytes_sent_per_step"] > 0


def test_one_sgd_step_is_exactly_minus_lr_times_the_mean_gradient(tiny_data, tmp_path):
    sizes = [784, 32, 32, 10]
    start = Model(sizes, he_init(sizes, 11))
    save_model(tmp_path / "init.json", start)
    lr = 0.05
    train(config(tiny_data, tmp_path / "run", workers=3, epochs=1, optimizer="sgd", lr=lr, lr_schedule="constant", shift=0,
                 shuffle=False, limit_train=500, batch_size=500, init=str(tmp_path / "init.json")))
    after = load_model(tmp_path / "run" / "weights.json")
    assert load_model(tmp_path / "init.json").params == start.params  # --init reads the file bit-for-bit
    train_set = mnist.load_split(tiny_data, "train")
    _, grads = textbook.mean_loss_and_gradient(textbook.unflatten(start.params, sizes),
                                               textbook.decode(train_set.images, range(500)), list(train_set.labels[:500]))
    expected = [w - lr * g for w, g in zip(start.params, [x for dW, db in grads for x in [v for row in dW for v in row] + db])]
    worst = max(abs(a - e) / max(abs(e), 1e-3) for a, e in zip(after.params, expected))
    assert worst <= 1e-9


def test_evaluate_agrees_example_for_example(tiny_data, tmp_path):
    train(config(tiny_data, tmp_path / "run", epochs=1))
    result = evaluate(str(tmp_path / "run"), str(tiny_data), workers=3)
    test_set = mnist.load_split(tiny_data, "t10k")
    model = load_model(tmp_path / "run" / "weights.json")
    predictions, probs = textbook.predict(textbook.unflatten(model.params, model.sizes), textbook.decode(test_set.images, range(test_set.count)))
    assert result["predictions"] == predictions
    assert sum(map(sum, result["confusion"])) == test_set.count
    assert result["test_accuracy"] == sum(p == y for p, y in zip(predictions, test_set.labels)) / test_set.count
    import math
    ref_loss = -sum(math.log(p[y]) for p, y in zip(probs, test_set.labels)) / test_set.count
    assert result["test_loss"] == pytest.approx(ref_loss, rel=1e-9)


def test_resume_at_an_epoch_boundary_is_bit_exact(tiny_data, tmp_path):
    straight = train(config(tiny_data, tmp_path / "straight", epochs=4))
    train(config(tiny_data, tmp_path / "split", epochs=2))
    resumed = train(config(tiny_data, None, epochs=4), resume=str(tmp_path / "split"))
    assert load_model(tmp_path / "split").params == load_model(tmp_path / "straight").params
    assert [m["test_loss"] for m in resumed] == [m["test_loss"] for m in straight]


@pytest.mark.parametrize("workers, rotate", [(1, 0), (3, 10)])
def test_resume_mid_epoch_is_bit_exact(tiny_data, tmp_path, workers, rotate):
    from parallel_nn.run.train import Interrupted

    train(config(tiny_data, tmp_path / "straight", epochs=2, workers=workers, rotate=rotate))
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["rotate"] == rotate

    def interrupt_at(epoch, step):
        if (epoch, step) == (1, 5):
            os.kill(os.getpid(), __import__("signal").SIGINT)  # what Ctrl-C does: a flag, checked before the next step

    with pytest.raises(Interrupted):
        train(config(tiny_data, tmp_path / "cut", epochs=2, workers=workers, rotate=rotate), on_step=interrupt_at)
    _, checkpoint = load_checkpoint(tmp_path / "cut" / "checkpoint.json")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 5)
    train(config(tiny_data, None, epochs=2, workers=workers), resume=str(tmp_path / "cut"))
    assert load_model(tmp_path / "cut").params == load_model(tmp_path / "straight").params


def test_truncated_checkpoint_is_refused(tiny_data, tmp_path):
    train(config(tiny_data, tmp_path / "run", epochs=1))
    path = tmp_path / "run" / "checkpoint.json"
    path.write_text(path.read_text()[:1000])
    with pytest.raises(UserError, match="checkpoint.json: not valid JSON.*truncated or corrupt checkpoint"):
        train(config(tiny_data, None, epochs=2), resume=str(tmp_path / "run"))


def test_init_with_other_layer_sizes_is_refused(tiny_data, tmp_path):
    save_model(tmp_path / "w.json", Model([784, 8, 10], he_init([784, 8, 10], 0)))
    with pytest.raises(UserError, match="pass --hidden 8"):
        train(config(tiny_data, tmp_path / "run", init=str(tmp_path / "w.json")))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "parallel_nn", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--batch-size", "3", "--workers", "8"], "--workers 8 is more than --batch-size 3"),
    (["--lr", "-0.1"], "--lr"),
    (["--hidden", "0"], "--hidden: every hidden layer needs at least 1 unit"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--resume", "runs/x", "--lr", "0.5"], "--lr cannot change"),
    (["--resume", "runs/x", "--init", "w.json"], "--init cannot change"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --backend ray"),
    (["--backend", "ray", "--reduce", "workers"], "on Ray the driver reduces"),
    (["--backend", "spark"], "invalid choice"),
])
def test_nonsense_flags_are_usage_errors(args, message):
    done = cli(*args)
    assert done.returncode == 2 and message in done.stderr


def test_missing_data_and_bad_weights_are_one_line_errors(tmp_path, tiny_data):
    done = cli("--data-dir", str(tmp_path / "nowhere"), "--epochs", "1", "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "is missing; run `make datasets`" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "bad.json").write_text('{"format": "parallel_nn.weights/1", "layer_sizes": [784, 10], "layers": [')
    done = cli("evaluate", str(tmp_path / "bad.json"), "--data-dir", str(tiny_data))
    assert done.returncode == 1 and "bad.json: not valid JSON" in done.stderr and "Traceback" not in done.stderr
    done = cli("evaluate", str(tmp_path / "bad.json"), "--data-dir", str(tiny_data), "--debug")
    assert "Traceback" in done.stderr


def test_cli_train_evaluate_gradcheck(tiny_data, tmp_path):
    done = cli("--workers", "2", "--epochs", "1", "--batch-size", "100", "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert "epoch  1/1" in done.stdout and "test loss" in done.stdout
    done = cli("evaluate", str(tmp_path / "r"), "--json", "--data-dir", str(tiny_data), "--workers", "2")
    result = json.loads(done.stdout)
    assert set(result) == {"test_loss", "test_accuracy", "confusion"} and len(result["confusion"]) == 10
    done = cli("gradcheck")
    assert done.returncode == 0 and "ok" in done.stdout


def test_a_full_disk_loses_nothing(tiny_data, tmp_path, monkeypatch):
    import errno

    from parallel_nn import atomic

    train(config(tiny_data, tmp_path / "run", epochs=1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    calls = []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) >= 2:  # config.json fits; the checkpoint at the end of the epoch does not
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(UserError, match="checkpoint.json: No space left on device"):
        train(config(tiny_data, None, epochs=2), resume=str(tmp_path / "run"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert sorted(after) == sorted(before)  # no temporary files left behind
    # progress.jsonl has the steps made since (a resume cuts it back to the checkpoint's)
    changing = ("config.json", "progress.jsonl")
    assert {k: v for k, v in after.items() if k not in changing} == {k: v for k, v in before.items() if k not in changing}
    monkeypatch.undo()
    train(config(tiny_data, None, epochs=2), resume=str(tmp_path / "run"))  # and the run still resumes
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    steps = [json.loads(line)["i"] for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) == 2 * len(before["progress.jsonl"].splitlines())


def test_a_closed_pipe_is_quiet(tiny_data, tmp_path):
    """`evaluate ... | head -1`: the reader may be gone before the output is flushed."""
    train(config(tiny_data, tmp_path / "run", epochs=1))
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", "evaluate", str(tmp_path / "run"), "--data-dir", str(tiny_data),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.close()  # nobody will read what it prints
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_ray_backend_without_ray_names_the_extra(tiny_data, tmp_path):
    """Whether or not Ray is installed here: hide it, as on an interpreter it has no build for."""
    code = ("import sys; sys.modules['ray'] = None; from parallel_nn.cli import main; "
            f"sys.exit(main(['--backend', 'ray', '--epochs', '1', '--data-dir', {str(tiny_data)!r}, "
            f"'--run-dir', {str(tmp_path / 'run')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "needs Ray" in done.stderr and ("'.[ray]'" in done.stderr or "EXTRAS=dev,ray" in done.stderr)


def test_the_defaults_are_the_studied_recipe():
    """What the accuracy study (docs/accuracy.md) chose: Nesterov at lr 0.15, step decay, one-pixel shifts."""
    from parallel_nn.cli import parse

    _, args = parse([])
    config = Config(**{k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__})
    assert (config.optimizer, config.resolved_lr(), config.lr_schedule, config.shift, config.momentum) == \
        ("nesterov", 0.15, "step", 1, 0.9)
    assert Config().optimizer == "nesterov" and Config().shift == 1  # the API's defaults are the CLI's
