"""Tensor2D: matrices as lists of rows of floats, and the kernels the network is built from.

Two kinds of code live here. The small broadcasting ops (add, sub, mul, div, matmul) are the
readable vocabulary of the original program. The kernels the training step runs are written
around one fact: in CPython a loop is slow and a C-level call is fast, so every inner loop of the
dense layers is a dot product done by `math.sumprod` (Python >= 3.12) or `sum(map(mul, a, b))`,
and nothing is re-transposed or recomputed per example. The sparse first layer, two thirds of the
work, goes further: its pixels are small integers, so it multiplies whole packed rows of weights
at once (lanes.py).
"""

from __future__ import annotations

import math
import operator
from itertools import compress, cycle
from operator import itemgetter, mul
from typing import Callable, Sequence, Union

from parallel_nn.kernels import lanes

Vector = list[float]
Tensor2D = list[list[float]]
Operand = Union[float, Tensor2D]

if hasattr(math, "sumprod"):  # Python >= 3.12: one C call, about 3x faster
    dot = math.sumprod
else:

    def dot(a: Sequence[float], b: Sequence[float]) -> float:
        """sum_i a[i] * b[i]"""
        return sum(map(mul, a, b))


# ---- the readable vocabulary (broadcasting like numpy, for scalars, rows and columns) ----


def shape(A: Tensor2D) -> tuple[int, int]:
    return len(A), len(A[0]) if A else 0


def transpose(A: Tensor2D) -> Tensor2D:
    return [list(column) for column in zip(*A)]


def _broadcast(B: Operand, rows: int, cols: int) -> Tensor2D:
    """B as a rows x cols matrix: a scalar, a 1 x cols row, a rows x 1 column, or already full."""
    if isinstance(B, (int, float)):
        return [[float(B)] * cols for _ in range(rows)]
    b_rows, b_cols = shape(B)
    if (b_rows, b_cols) == (rows, cols):
        return B
    if b_rows == 1 and b_cols == cols:
        return [B[0]] * rows
    if b_cols == 1 and b_rows == rows:
        return [[row[0]] * cols for row in B]
    raise ValueError(f"cannot broadcast a {b_rows}x{b_cols} matrix to {rows}x{cols}")


def _elementwise(op: Callable[[float, float], float]) -> Callable[[Operand, Operand], Tensor2D]:
    def apply(A: Operand, B: Operand) -> Tensor2D:
        if isinstance(A, (int, float)):  # scalar on the left: broadcast it against B
            rows, cols = shape(B)
            A = _broadcast(A, rows, cols)
        rows, cols = shape(A)
        B = _broadcast(B, rows, cols)
        return [list(map(op, a, b)) for a, b in zip(A, B)]

    return apply


add = _elementwise(operator.add)
sub = _elementwise(operator.sub)
mul_elementwise = _elementwise(operator.mul)
div = _elementwise(operator.truediv)


def matmul(A: Tensor2D, B: Tensor2D) -> Tensor2D:
    """C[n][m] = sum_k A[n][k] * B[k][m], with B's columns transposed once, not per row."""
    if A and B and len(A[0]) != len(B):
        raise ValueError(f"matmul: {shape(A)} x {shape(B)}")
    return matmul_bt(A, transpose(B))


def matmul_bt(A: Tensor2D, BT: Tensor2D) -> Tensor2D:
    """C[n][m] = sum_k A[n][k] * BT[m][k]: A times B-transposed, each entry one dot product.

    This is a linear layer's shape: with W stored as fan_out rows of fan_in, Z = A W^T.
    """
    return [[dot(a, b) for b in BT] for a in A]


# ---- the training kernels ----


def linear(A: Tensor2D, W: Tensor2D, b: Vector) -> Tensor2D:
    """Z[n][j] = sum_i A[n][i] * W[j][i] + b[j]"""
    return [[dot(a, w) + bj for w, bj in zip(W, b)] for a in A]


def relu(Z: Tensor2D) -> Tensor2D:
    return [[z if z > 0.0 else 0.0 for z in row] for row in Z]


def relu_backward(dA: Tensor2D, Z: Tensor2D) -> Tensor2D:
    """dZ = dA where Z > 0, else 0 (the derivative at exactly 0 is taken as 0)."""
    return [[d if z > 0.0 else 0.0 for d, z in zip(da, zs)] for da, zs in zip(dA, Z)]


def weight_grad(dZ: Tensor2D, A: Tensor2D) -> Tensor2D:
    """dW[j][i] = sum_n dZ[n][j] * A[n][i]: dot products over the batch, both sides transposed once."""
    AT = list(zip(*A))
    return [[dot(dz, a) for a in AT] for dz in zip(*dZ)]


def input_grad(dZ: Tensor2D, W: Tensor2D) -> Tensor2D:
    """dA[n][i] = sum_j dZ[n][j] * W[j][i]: dZ times W, with W's columns transposed once."""
    return matmul_bt(dZ, transpose(W))


def column_sums(dZ: Tensor2D) -> Vector:
    """db[j] = sum_n dZ[n][j]"""
    return [sum(column) for column in zip(*dZ)]


def doubles(buffer) -> memoryview:
    """A float64 buffer (bytes, or a view of shared memory) seen as floats, without a copy."""
    view = memoryview(buffer)
    return view if view.format == "d" else view.cast("d")


def floats(buffer) -> Vector:
    """The float64 values in a buffer as a list."""
    return doubles(buffer).tolist()


def add_into(total: Vector, part: Sequence[float]) -> None:
    """total[p] += part[p], in place (the reduction's inner loop)."""
    total[:] = map(operator.add, total, part)


def sgd_update(params: Vector, grad: Vector, lr: float, scale: float) -> Vector:
    """p - lr * (scale * g), for every parameter."""
    return [p - lr * (g * scale) for p, g in zip(params, grad)]


def momentum_update(params: Vector, v: Vector, grad: Vector, lr: float, mu: float, scale: float,
                    nesterov: bool) -> tuple[Vector, Vector]:
    """(new params, new v): v = mu v + scale g; p - lr v, or p - lr (scale g + mu v) for Nesterov."""
    v = [mu * vi + g * scale for vi, g in zip(v, grad)]
    if nesterov:
        return [p - lr * (g * scale + mu * vi) for p, g, vi in zip(params, grad, v)], v
    return [p - lr * vi for p, vi in zip(params, v)], v


def _gatherer(indices: list[int]) -> Callable[[Sequence], Sequence]:
    """A C-speed `lambda seq: [seq[i] for i in indices]` (itemgetter returns a bare item for one index)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda seq: (seq[only],)
    return itemgetter(*indices)


# A pixel is a byte, its level; its value is level / LEVELS.
LEVELS = 255
PIXEL_VALUES = [v / LEVELS for v in range(256)]  # decoding a level is one list lookup, not a division


class SparseMatrix:
    """A batch of uint8 rows, decoded lazily into only the non-zero entries.

    MNIST images are ~81% zeros, so the first layer touches ~150 of 784 pixels per image. The raw
    bytes stay bytes (the cheapest representation to ship and store); `rows` and `columns` are the
    two sparse views the forward and backward passes need. Both keep the levels as bytes: the
    kernels turn them into floats (loops.py) or multiply packed ints by them (lanes.py).
    """

    def __init__(self, raw: bytes, width: int, decode_rows: "Callable | None" = None):
        if width <= 0 or len(raw) % width:
            raise ValueError(f"{len(raw)} bytes do not make rows of {width}")
        self.raw, self.width = bytes(raw), width
        self.height = len(raw) // width
        self._decode_rows = decode_rows or sparse_rows  # kernels.sparse_rows: the interpreter's fastest
        self._rows: list[tuple[list[int], bytes]] | None = None
        self._columns: list[tuple[int, list[int], bytes]] | None = None

    @property
    def rows(self) -> list[tuple[list[int], bytes]]:
        """Per row n: (the columns i where X[n][i] != 0, their levels)."""
        if self._rows is None:
            self._rows = self._decode_rows(self.raw, self.width)
        return self._rows

    @property
    def columns(self) -> list[tuple[int, list[int], bytes]]:
        """Per column i with any non-zero: (i, the rows n where X[n][i] != 0, their levels)."""
        if self._columns is None:
            w = self.width
            transposed = b"".join([self.raw[i::w] for i in range(w)])  # strided slices: one C call per column
            columns = self._decode_rows(transposed, self.height) if self.height else []  # no rows: no columns
            self._columns = [(i, rows, levels) for i, (rows, levels) in enumerate(columns) if rows]
        return self._columns

    def dense(self) -> Tensor2D:
        decode = PIXEL_VALUES.__getitem__
        w = self.width
        return [list(map(decode, self.raw[s : s + w])) for s in range(0, len(self.raw), w)]


def sparse_rows(raw: bytes, width: int) -> list[tuple[list[int], bytes]]:
    """Per row of `width` bytes: (positions of its non-zero bytes, those bytes), for the whole batch
    in two C calls (positions by `compress`, levels by deleting the zeros), then cut row by row."""
    positions = list(compress(cycle(range(width)), raw))
    levels = raw.replace(b"\0", b"")
    rows, start = [], 0
    for row_start in range(0, len(raw), width):
        stop = start + width - raw.count(0, row_start, row_start + width)
        rows.append((positions[start:stop], levels[start:stop]))
        start = stop
    return rows


def first_layer_lanes(W: Tensor2D, width: int) -> "lanes.Lanes | None":
    """The lanes sparse_linear packs W's columns into, for inputs `width` pixels wide; None where W
    cannot be packed (not finite, or too small) and floats must do."""
    return lanes_for(lanes.magnitudes(W), width)  # output j's lane holds row j of W


def lanes_for(largest: Sequence[float], width: int) -> "lanes.Lanes | None":
    """first_layer_lanes from the magnitudes of W's rows (lanes.magnitudes, or lanes.combine of parts)."""
    if not lanes.fits(largest):
        return None
    return lanes.Lanes(largest, LEVELS * width, LEVELS)


def sparse_linear(X: SparseMatrix, W: Tensor2D, b: Vector, packed: "tuple | None" = None) -> Tensor2D:
    """Z[n][j] = sum_{i: X[n][i] != 0} X[n][i] * W[j][i] + b[j]

    With W's columns packed (lanes.py), Z[n] is sum_i level[n][i] * packed column i: one int
    multiply-add per lit pixel for all outputs at once. `packed`: (layout, columns) made already
    (first_layer_lanes, then its pack_columns(W)), as workers that share the packing pass them.
    """
    if packed is None:
        layout = first_layer_lanes(W, X.width)
        if layout is None:
            return linear(X.dense(), W, b)
        columns = layout.pack_columns(W)
    else:
        layout, columns = packed
    Z = []
    for positions, levels in X.rows:
        if not positions:
            Z.append(list(b))
            continue
        total = sum(map(mul, levels, _gatherer(positions)(columns)))
        Z.append(list(map(operator.add, layout.unpack(total, sum(levels)), b)))
    return Z


def sparse_weight_grad(dZ: Tensor2D, X: SparseMatrix) -> Tensor2D:
    """dW[j][i] = sum_{n: X[n][i] != 0} dZ[n][j] * X[n][i]; columns of X that are all zero give 0.

    With dZ's rows packed, column i of dW is sum_n level[n][i] * packed dZ[n].
    """
    outputs = len(dZ[0]) if dZ else 0
    largest = lanes.magnitudes(zip(*dZ))  # output j's lane holds column j of dZ
    if not lanes.fits(largest):
        return weight_grad(dZ, X.dense())
    layout = lanes.Lanes(largest, LEVELS * X.height, LEVELS)
    packed = layout.pack(dZ)
    dWT: list[Sequence[float]] = [(0.0,) * outputs] * X.width
    for i, rows, levels in X.columns:
        dWT[i] = layout.unpack(sum(map(mul, levels, _gatherer(rows)(packed))), sum(levels))
    return [list(row) for row in zip(*dWT)]
