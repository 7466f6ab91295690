"""tutorial/minimal.py, the reader's way in, computes what the trainer computes."""

import subprocess
import sys
from pathlib import Path

from parallel_nn.nn.network import he_init
from parallel_nn.parallel.local.pool import LocalEngine
from tutorial.minimal import SIZES, Pool

ROOT = Path(__file__).resolve().parent.parent


def test_the_tutorials_weights_are_the_trainers(tiny_splits):
    """Five SGD steps of 3 workers: the tutorial's pool and the local engine's gradient sums."""
    train_set, test_set = tiny_splits
    start, lr, batches = he_init(SIZES, 0), 0.5, [list(range(k, 1200, 7))[:100] for k in range(5)]
    pool = Pool(3, start, train_set.images, train_set.labels)
    try:
        for batch in batches:
            pool.step(batch, lr)
        tutorial = pool.params()
    finally:
        pool.close()
    params = start
    with LocalEngine(SIZES, train_set, test_set, 3) as engine:
        for batch in batches:
            engine.set_params(params)
            total = engine.gradient(batch)[0]
            params = [w - lr * (g * (1.0 / len(batch))) for w, g in zip(params, total)]
    assert tutorial != start
    assert max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(tutorial, params)) <= 1e-9


def test_the_tutorial_runs_from_the_command_line(tiny_data):
    done = subprocess.run([sys.executable, "tutorial/minimal.py", "--workers", "2", "--batch-size", "100",
                           "--data-dir", str(tiny_data)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "epoch 1: train loss" in done.stdout and "test accuracy" in done.stdout
    bad = subprocess.run([sys.executable, "tutorial/minimal.py", "--workers", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--workers must be" in bad.stderr
