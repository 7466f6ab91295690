"""The training kernels as plain loops: the variant a tracing JIT (PyPy) turns into machine code.

On CPython a Python-level loop costs ~50 ns an iteration, so tensor.py pushes every inner loop
into one C call (`math.sumprod`, `map`, `itemgetter`, `compress`). PyPy's JIT sees through a
plain `for` over lists of floats and compiles it to a tight loop, but cannot see into those C
helpers, so on PyPy the same maths runs ~5x faster written the obvious way. Each function here
computes exactly what its namesake in tensor.py computes (the tests check both against the plain
definitions); kernels/__init__.py picks one set once, at import.

Loop order is chosen for the JIT: the innermost loop walks one row of a list of lists and
accumulates into another row, so it is a straight multiply-add over contiguous floats.
"""

from __future__ import annotations

from array import array
from typing import Sequence

from parallel_nn.kernels.tensor import PIXEL_VALUES, SparseMatrix, Tensor2D, Vector


def linear(A: Tensor2D, W: Tensor2D, b: Vector) -> Tensor2D:
    """Z[n][j] = sum_i A[n][i] * W[j][i] + b[j]"""
    Z = []
    inputs = len(W[0]) if W else 0
    for a in A:
        z = []
        for j in range(len(W)):
            w, total = W[j], 0.0
            for i in range(inputs):
                total += a[i] * w[i]
            z.append(total + b[j])
        Z.append(z)
    return Z


def relu(Z: Tensor2D) -> Tensor2D:
    return [[z if z > 0.0 else 0.0 for z in row] for row in Z]


def relu_backward(dA: Tensor2D, Z: Tensor2D) -> Tensor2D:
    """dZ = dA where Z > 0, else 0 (the derivative at exactly 0 is taken as 0)."""
    return [[d if z > 0.0 else 0.0 for d, z in zip(da, zs)] for da, zs in zip(dA, Z)]


def weight_grad(dZ: Tensor2D, A: Tensor2D) -> Tensor2D:
    """dW[j][i] = sum_n dZ[n][j] * A[n][i], accumulated example by example."""
    outputs, inputs = (len(dZ[0]), len(A[0])) if dZ else (0, 0)
    dW = [[0.0] * inputs for _ in range(outputs)]
    for dz, a in zip(dZ, A):
        for j in range(outputs):
            d, row = dz[j], dW[j]
            for i in range(inputs):
                row[i] += d * a[i]
    return dW


def input_grad(dZ: Tensor2D, W: Tensor2D) -> Tensor2D:
    """dA[n][i] = sum_j dZ[n][j] * W[j][i]"""
    inputs = len(W[0]) if W else 0
    dA = []
    for dz in dZ:
        acc = [0.0] * inputs
        for j in range(len(W)):
            d, w = dz[j], W[j]
            for i in range(inputs):
                acc[i] += d * w[i]
        dA.append(acc)
    return dA


def column_sums(dZ: Tensor2D) -> Vector:
    """db[j] = sum_n dZ[n][j]"""
    sums = [0.0] * (len(dZ[0]) if dZ else 0)
    for dz in dZ:
        for j in range(len(sums)):
            sums[j] += dz[j]
    return sums


def sparse_rows(raw: bytes, width: int) -> list[tuple[list[int], bytes]]:
    """Per row of `width` bytes: (positions of its non-zero bytes, those bytes)."""
    rows = []
    for start in range(0, len(raw), width):
        positions, levels = [], bytearray()
        for i in range(width):
            level = raw[start + i]
            if level:
                positions.append(i)
                levels.append(level)
        rows.append((positions, bytes(levels)))
    return rows


def sparse_linear(X: SparseMatrix, W: Tensor2D, b: Vector, packed=None) -> Tensor2D:
    """Z[n][j] = sum_{i: X[n][i] != 0} X[n][i] * W[j][i] + b[j] (`packed`: the lanes of CPython's kernel; unused)"""
    Z = []
    for indices, levels in X.rows:
        values = [PIXEL_VALUES[level] for level in levels]
        z = []
        for j in range(len(W)):
            w, total = W[j], 0.0
            for t in range(len(indices)):
                total += values[t] * w[indices[t]]
            z.append(total + b[j])
        Z.append(z)
    return Z


def sparse_weight_grad(dZ: Tensor2D, X: SparseMatrix) -> Tensor2D:
    """dW[j][i] = sum_{n: X[n][i] != 0} dZ[n][j] * X[n][i]; columns of X that are all zero give 0."""
    outputs = len(dZ[0]) if dZ else 0
    dWT: list[Vector] = [[0.0] * outputs for _ in range(X.width)]  # dWT[i] is column i of dW
    for dz, (indices, levels) in zip(dZ, X.rows):
        values = [PIXEL_VALUES[level] for level in levels]
        for t in range(len(indices)):
            v, column = values[t], dWT[indices[t]]
            for j in range(outputs):
                column[j] += dz[j] * v
    return [list(row) for row in zip(*dWT)]


def add_into(total: Vector, part: Sequence[float]) -> None:
    """total[p] += part[p]: the reduction's inner loop."""
    for p in range(len(total)):
        total[p] += part[p]


def sgd_update(params: Vector, grad: Vector, lr: float, scale: float) -> Vector:
    """p - lr * (scale * g), for every parameter."""
    new = [0.0] * len(params)
    for p in range(len(params)):
        new[p] = params[p] - lr * (grad[p] * scale)
    return new


def momentum_update(params: Vector, v: Vector, grad: Vector, lr: float, mu: float, scale: float,
                    nesterov: bool) -> tuple[Vector, Vector]:
    """(new params, new v): v = mu v + scale g; p - lr v, or p - lr (scale g + mu v) for Nesterov.
    One pass writing both: the JIT keeps it in registers (5x the two comprehensions on PyPy)."""
    new, new_v = [0.0] * len(params), [0.0] * len(params)
    for p in range(len(params)):
        vp = mu * v[p] + grad[p] * scale
        new_v[p] = vp
        new[p] = params[p] - lr * (grad[p] * scale + mu * vp) if nesterov else params[p] - lr * vp
    return new, new_v


def floats(buffer) -> Sequence[float]:
    """The float64 values in a buffer (a shared-memory view, bytes), as a fresh array: copied in
    bulk, since the JIT indexes an array as fast as a list but a memoryview element by element."""
    if isinstance(buffer, memoryview) and buffer.format != "B":
        buffer = buffer.cast("B")  # CPython's frombytes takes bytes only (PyPy's takes either)
    values = array("d")
    values.frombytes(buffer)
    return values
