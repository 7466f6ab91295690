"""Checks on the real MNIST files: skipped cleanly when they are absent (CI fetches them)."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import textbook
from parallel_nn.data import mnist
from parallel_nn.nn.network import Model, he_init
from parallel_nn.run.checkpoint import load_model, save_model
from parallel_nn.run.train import Config, train


def test_real_data_loads_and_matches_its_checksums(real_data):
    train_set, test_set = mnist.load(real_data)
    assert (train_set.count, test_set.count) == (60000, 10000)
    header = mnist.idx_bytes([60000, 28, 28], b"")
    assert hashlib.sha256(header + train_set.images).hexdigest() == mnist.SHA256["train-images-idx3-ubyte"]
    zeros = train_set.images.count(0) / len(train_set.images)
    assert 0.75 < zeros < 0.85  # the sparsity the first-layer kernel is built on


def test_real_data_one_sgd_step_equals_the_textbook(real_data, tmp_path):
    """--init, --optimizer sgd, --shift 0, --no-shuffle, 500 images, batch 500: W moves by exactly -lr dL/dW."""
    sizes = [784, 32, 32, 10]
    start = Model(sizes, he_init(sizes, 5))
    save_model(tmp_path / "init.json", start)
    lr = 0.1
    train(Config(workers=2, epochs=1, batch_size=500, limit_train=500, limit_test=100, shuffle=False, optimizer="sgd", shift=0,
                 lr=lr, lr_schedule="constant", init=str(tmp_path / "init.json"), data_dir=str(real_data),
                 run_dir=str(tmp_path / "run"), quiet=True))
    after = load_model(tmp_path / "run")
    train_set = mnist.load_split(real_data, "train")
    _, grads = textbook.mean_loss_and_gradient(textbook.unflatten(start.params, sizes),
                                               textbook.decode(train_set.images, range(500)), list(train_set.labels[:500]))
    flat_grad = [x for dW, db in grads for x in [v for row in dW for v in row] + db]
    moved = [(a - s) / -lr for a, s in zip(after.params, start.params)]  # the step, divided by -lr
    scale = max(abs(g) for g in flat_grad)
    assert max(abs(m - g) for m, g in zip(moved, flat_grad)) <= 1e-9 * scale


# SHA-256 of weights.json after the run below, recorded by the code before the trainer became a
# Run with listeners (commit 427bf40): the refactor must not move a bit. Per interpreter, since the
# kernels differ (loops on PyPy; C-level idioms on CPython, whose float sum changed in 3.12).
RECORDED_WEIGHTS = {
    ("pypy", (3, 9)): "b4523b055b5a40ed9d730ceedad5220607eeac6fdf109b3e88f0aa1ca8ff57b1",
    ("cpython", (3, 11)): "c1bc88bcc5db39444580a826e4e836506c593595876b745575fcebf6dc62757f",
    ("cpython", (3, 12)): "588f829a2286f83aaa9af8d59f8fc0c5e71f8a71fbeddd1e7bda70659de35236",
}


def test_real_data_a_short_run_ends_with_the_recorded_weights(real_data, tmp_path):
    recorded = RECORDED_WEIGHTS.get((sys.implementation.name, sys.version_info[:2]))
    if recorded is None:
        pytest.skip(f"no weights recorded for {sys.implementation.name} {sys.version_info[:2]}")
    train(Config(workers=2, epochs=2, limit_train=3000, limit_test=500, rotate=5, data_dir=str(real_data),
                 run_dir=str(tmp_path / "run"), quiet=True))
    assert hashlib.sha256((tmp_path / "run" / "weights.json").read_bytes()).hexdigest() == recorded


def test_real_data_the_python_examples_in_the_docs_run(real_data, tmp_path):
    """Every ```python block of the README and docs/ runs as written, from a directory with the data where `make datasets` puts it."""
    root = Path(__file__).resolve().parent.parent
    blocks = [block for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
              for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    assert blocks
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "mnist").symlink_to(Path(real_data).resolve())
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{block}\n{done.stderr}"
