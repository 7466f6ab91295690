"""Many floats in one Python int: how CPython runs the sparse first layer.

The first layer does (pixels lit in the batch) x (outputs) multiply-adds, 2.4 million per batch
of 500 each way. Done as floats, every one of them costs CPython a gather (~10 ns) and a step of
`sumprod` (~9 ns on 3.12, ~22 ns for `sum(map(mul, ...))` on 3.11) however it is arranged. But a
pixel is a byte b (its value is b / 255), and Python ints have arbitrary size with arithmetic
done in C over machine words. So we pack a whole vector into one int, each entry a fixed-point
number in its own field of `width` bytes (a "lane"):

    packed(v) = sum_k (BIAS + round(v[k] * 2**F)) << (8 * width * k)

Then b * packed(v) multiplies every lane by b, and adding packed ints adds lane by lane, carries
never crossing a lane boundary because each lane is wide enough for the largest sum. One int
multiply-add does all 32 outputs' multiply-adds: ~30 ns for what cost 32 x ~20 ns as floats.

BIAS (about 2**62) keeps every lane non-negative, so reading a lane is `int.from_bytes`; the
lane's sum of biases, BIAS * (sum of the b), is subtracted on the way out. F is chosen per packing
so the largest magnitude gets 51 bits: each entry is exact to 2**-52 of the largest, like float64
itself, and a 150-term sum stays within ~1e-15 of the float computation's (tests check 1e-12
against the plain definitions and the textbook). Integer addition is exact and associative, so a
result does not depend on the order examples are added in.
"""

from __future__ import annotations

import math
import struct
from itertools import repeat
from operator import add, mul
from typing import Iterable, Sequence

# x + ROUNDER, for |x| < 2**51, lies in [2**52, 2**53], where doubles are the integers: the sum is
# x rounded to the nearest integer, and its IEEE-754 bits, read as an unsigned integer, are
# BIAS + round(x). So packing x + ROUNDER with struct's "d" converts to fixed point in C, with no
# int object per value. (At 2**53 the exponent steps up and the bits still count on by one.)
FIXED_BITS = 51
ROUNDER = 1.5 * 2.0**52
BIAS = int.from_bytes(struct.pack("<d", ROUNDER), "little")  # (1075 << 52) + 2**51, about 2**62.07


class Lanes:
    """A fixed-point layout: `count` lanes of `width` bytes for values up to `magnitude`, in sums
    of packed ints with small non-negative integer weights adding up to at most `weight_limit`."""

    def __init__(self, count: int, magnitude: float, weight_limit: int, divisor: float = 1.0):
        # magnitude < 2**exponent, so |v * 2**F| < 2**51 for every |v| <= magnitude
        exponent = math.frexp(magnitude)[1] if magnitude > 0 else 0
        self.fraction_bits = FIXED_BITS - exponent
        # a lane holds sum(weight * (BIAS + q)) < weight_limit * 2**63
        self.width = (63 + max(1, weight_limit).bit_length() + 7) // 8
        self.count = count
        self.scale = math.ldexp(1.0, self.fraction_bits)
        # reading a lane gives divisor * 2**F * (the float sum): undo both in one division
        self.denominator = divisor * self.scale
        self._struct = struct.Struct("<" + f"d{self.width - 8}x" * count)
        self._starts = range(0, count * self.width, self.width)

    def _fixed(self, values: Iterable[float]) -> Iterable[float]:
        """v * 2**F + ROUNDER for each value: what struct packs as BIAS + round(v * 2**F)."""
        return map(add, map(mul, values, repeat(self.scale)), repeat(ROUNDER))

    def pack(self, vectors: Iterable[Sequence[float]]) -> list[int]:
        """One int per vector of `count` floats."""
        pack, frm = self._struct.pack, int.from_bytes
        return [frm(pack(*self._fixed(v)), "little") for v in vectors]

    def pack_columns(self, M: Sequence[Sequence[float]]) -> list[int]:
        """One int per column of M (M has `count` rows): what pack(zip(*M)) gives, converting row by row."""
        fixed = [list(self._fixed(row)) for row in M]
        pack, frm = self._struct.pack, int.from_bytes
        return [frm(pack(*column), "little") for column in zip(*fixed)]

    def unpack(self, total: int, weight_sum: int) -> list[float]:
        """The `count` floats in `total`, a sum of packed ints with integer weights adding to weight_sum."""
        raw = total.to_bytes(self.count * self.width, "little")
        width, frm, bias, denominator = self.width, int.from_bytes, BIAS * weight_sum, self.denominator
        return [(frm(raw[s : s + width], "little") - bias) / denominator for s in self._starts]


def magnitude(M: Iterable[Sequence[float]]) -> float:
    """The largest |entry| of a matrix, or inf when an entry is inf or nan."""
    largest = 0.0
    for row in M:
        if row:
            if not math.isfinite(sum(row)):  # max() would skip a nan, depending on where it is
                return math.inf
            largest = max(largest, max(row), -min(row))
    return largest


def fits(largest: float) -> bool:
    """Whether values up to `largest` can be packed: finite, and not so small that 2**F overflows
    (then the caller computes with floats, which gives the same inf, nan or tiny numbers)."""
    return largest == 0.0 or (math.isfinite(largest) and math.frexp(largest)[1] > -900)
