"""The kernels the training step runs, chosen once per interpreter.

CPython: tensor.py's C-level idioms (one `math.sumprod` or `map` call per inner loop, and the
first layer on packed ints, lanes.py). PyPy: loops.py's plain loops, which its JIT compiles and
which it runs ~5x faster than the C idioms.
Both compute the same maths (tests/test_tensor.py checks each against the plain definitions, and
the whole gradient against bench/textbook.py). `PARALLEL_NN_KERNELS=idioms|loops` overrides the
choice, for comparing the two on one interpreter; it must be set before the first import.
"""

from __future__ import annotations

import os
import platform

from parallel_nn.kernels import loops, tensor

IMPLEMENTATION = platform.python_implementation()  # "CPython", "PyPy"
KIND = os.environ.get("PARALLEL_NN_KERNELS") or ("loops" if IMPLEMENTATION == "PyPy" else "idioms")
if KIND not in ("idioms", "loops"):
    raise ImportError(f"PARALLEL_NN_KERNELS={KIND!r}: expected 'idioms' or 'loops'")

_source = loops if KIND == "loops" else tensor
linear = _source.linear
relu = _source.relu
relu_backward = _source.relu_backward
weight_grad = _source.weight_grad
input_grad = _source.input_grad
column_sums = _source.column_sums
sparse_linear = _source.sparse_linear
sparse_weight_grad = _source.sparse_weight_grad
add_into = _source.add_into
sparse_rows = _source.sparse_rows
sgd_update = _source.sgd_update
momentum_update = _source.momentum_update
floats = _source.floats
doubles = getattr(_source, "doubles", floats)  # the JIT's kernels copy anyway


def interpreter() -> str:
    """What runs this process, e.g. "CPython 3.11.7" or "PyPy 7.3.11 (Python 3.9.16)"."""
    version = platform.python_version()
    if IMPLEMENTATION == "PyPy":
        import sys

        pypy = ".".join(map(str, sys.pypy_version_info[:3]))  # type: ignore[attr-defined]
        return f"PyPy {pypy} (Python {version})"
    return f"{IMPLEMENTATION} {version}"


# What a run on CPython is told once (and `make`, when it builds its venv without PyPy): PyPy's
# epoch against CPython 3.12's and 3.13's on this project's 2-core machine, 1 and 2 workers
# (docs/speed.md#the-interpreter), and the README's command that installs it.
PYPY_EPOCH_SPEEDUP = "6-7x"
INSTALL_PYPY = "sudo apt-get install pypy3 pypy3-dev"


def slow_path_note() -> str:
    """One line for a process on CPython (empty on PyPy): how much faster PyPy trains, and how to get it."""
    if IMPLEMENTATION == "PyPy":
        return ""
    return (f"note: this is {interpreter()}; PyPy trains {PYPY_EPOCH_SPEEDUP} faster here (docs/speed.md): "
            f"`{INSTALL_PYPY}`, then `make train` builds its venv with it")
