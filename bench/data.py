"""The benchmark data: the real MNIST when `make datasets` has fetched it, else a synthetic set
with MNIST's shape and sparsity (~19% non-zero pixels, in strokes), so the kernels do the same work."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from parallel_nn.data import mnist

REAL = Path(__file__).resolve().parent.parent / "datasets" / "mnist"


def synthetic(count: int, seed: int) -> mnist.Split:
    rng = random.Random(seed)
    images = bytearray(count * mnist.PIXELS)
    for n in range(count):
        base = n * mnist.PIXELS
        for _ in range(150):  # ~150 of 784 pixels lit, like an MNIST digit
            images[base + rng.randrange(mnist.PIXELS)] = rng.randrange(1, 256)
    return mnist.Split(bytes(images), bytes(rng.randrange(10) for _ in range(count)))


def load() -> tuple[mnist.Split, mnist.Split, str]:
    """(train, test, a word saying which)."""
    if (REAL / "train-images-idx3-ubyte.gz").exists():
        train, test = mnist.load(REAL)
        return train, test, "MNIST"
    return synthetic(60000, 0), synthetic(10000, 1), "synthetic (run `make datasets` for MNIST)"


def spread(values: list[float], digits: int = 2) -> str:
    """'median (lowest-highest)' of per-round figures: what a benchmark reports, never its best round."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(lines: list[str], markdown: str | None) -> None:
    """Print a benchmark's table, and write it to `markdown` too when asked."""
    print("\n".join(lines))
    if markdown:
        with open(markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


def as_the_trainer_runs(module: str) -> None:
    """Run this benchmark under the settings `python -m parallel_nn` gives itself: on PyPy, the
    trainer's garbage collector settings (parallel_nn/__main__.py), by starting again with them."""
    from parallel_nn.__main__ import start_with_pypy_settings

    start_with_pypy_settings(module)
