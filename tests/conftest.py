"""Shared fixtures: tiny synthetic MNIST-shaped datasets written as real IDX files."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from parallel_nn.data import mnist

REAL_DATA = Path(__file__).resolve().parent.parent / "datasets" / "mnist"


def pytest_configure(config):
    """A test run ended by SIGTERM or SIGHUP (a CI timeout, a closed terminal) unwinds as Ctrl-C
    does, so fixtures' teardowns run: without it the browser tests' chromedriver and Chromium
    outlive pytest. Only in pytest's own process: a process forked from it goes as it would."""
    session = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != session:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) == signal.SIG_DFL:
            signal.signal(getattr(signal, name), interrupt)


def synthetic_split(count: int, seed: int) -> mnist.Split:
    """Digits drawn from 10 sparse prototype strokes plus noise: learnable, ~80% zero pixels like MNIST."""
    rng = random.Random(seed)
    proto_rng = random.Random(12345)  # the same prototypes for train and test
    prototypes = [set(proto_rng.sample(range(mnist.PIXELS), 110)) for _ in range(10)]
    images, labels = bytearray(), bytearray()
    for _ in range(count):
        digit = rng.randrange(10)
        on = {p for p in prototypes[digit] if rng.random() < 0.8} | set(rng.sample(range(mnist.PIXELS), 40))
        images += bytes(rng.randrange(100, 256) if i in on else 0 for i in range(mnist.PIXELS))
        labels.append(digit)
    return mnist.Split(bytes(images), bytes(labels))


def write_dataset(directory: Path, train_count: int, test_count: int, seed: int = 0) -> Path:
    mnist.write_split(directory, "train", synthetic_split(train_count, seed))
    mnist.write_split(directory, "t10k", synthetic_split(test_count, seed + 1))
    return directory


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """1,200 training and 300 test examples in a folder, as .gz IDX files."""
    return write_dataset(tmp_path_factory.mktemp("mnist"), 1200, 300)


@pytest.fixture(scope="session")
def tiny_splits(tiny_data):
    return mnist.load(tiny_data)


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not present (run `make datasets`)")
    return REAL_DATA


def pytest_collection_modifyitems(items):
    """The Ray tests run last: Ray's client library leaves threads behind in this process after
    ray.shutdown(), and a later fork (the local engine's default start method on Linux) can crash
    in them. A real run uses one backend per process, so only the test session meets this."""
    items.sort(key=lambda item: item.path.name == "test_ray.py")
