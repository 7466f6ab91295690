"""Many floats in one Python int: how CPython runs the sparse first layer.

The first layer does (pixels lit in the batch) x (outputs) multiply-adds, 2.4 million per batch
of 500 each way. Done as floats, every one of them costs CPython a gather (~10 ns) and a step of
`sumprod` (~9 ns on 3.12, ~22 ns for `sum(map(mul, ...))` on 3.11) however it is arranged. But a
pixel is a byte b (its value is b / 255), and Python ints have arbitrary size with arithmetic
done in C over machine words. So we pack a whole vector into one int, each entry a fixed-point
number in its own field of `width` bytes (a "lane"):

    packed(v) = sum_k (BIAS + round(v[k] * 2**F_k)) << (8 * width * k)

Then b * packed(v) multiplies every lane by b, and adding packed ints adds lane by lane, carries
never crossing a lane boundary because each lane is wide enough for the largest sum. One int
multiply-add does all 32 outputs' multiply-adds: ~30 ns for what cost 32 x ~20 ns as floats.

BIAS (about 2**62) keeps every lane non-negative, so reading a lane is `int.from_bytes`; the
lane's sum of biases, BIAS * (sum of the b), is subtracted on the way out. Each lane k has its own
F (F_k), chosen so that the largest magnitude in that lane gets 51 bits: each entry is exact to
2**-52 of its own lane's largest, like float64 itself, and a lane's sum of n terms of levels b_t
is within 2**-51 * max|v| * sum_t (b_t / 255) of the exact sum, whatever the other lanes hold (one
output's weight of 1e8 costs the other outputs nothing). A lane is one output (a row of W, a
column of dZ), so that is 1e-12 of the output's own scale; tests check it against the plain
definitions with adversarial magnitudes, and the worst-case sums at every width boundary.
Integer addition is exact and associative, so a result does not depend on the order examples are
added in.
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
    """A fixed-point layout: one lane of `width` bytes per entry of `magnitudes`, lane k for values up
    to magnitudes[k] (each finite and `fits`), in sums of packed ints with small non-negative integer
    weights adding up to at most `weight_limit`."""

    def __init__(self, magnitudes: Sequence[float], weight_limit: int, divisor: float = 1.0):
        # magnitude < 2**exponent, so |v * 2**F_k| < 2**51 for every |v| <= magnitude of lane k
        self.fraction_bits = [FIXED_BITS - (math.frexp(m)[1] if m > 0 else 0) for m in magnitudes]
        # a lane holds sum(weight * (BIAS + q)) < weight_limit * 2**63
        self.width = (63 + max(1, weight_limit).bit_length() + 7) // 8
        self.count = count = len(magnitudes)
        self.scales = [math.ldexp(1.0, f) for f in self.fraction_bits]
        # reading lane k gives divisor * 2**F_k * (the float sum): undo both in one division
        self.denominators = [divisor * scale for scale in self.scales]
        self._struct = struct.Struct("<" + f"d{self.width - 8}x" * count)
        # per lane: its bytes in to_bytes's output, and its denominator
        self._lanes = list(zip([slice(s, s + self.width) for s in range(0, count * self.width, self.width)],
                               self.denominators))

    def pack(self, vectors: Iterable[Sequence[float]]) -> list[int]:
        """One int per vector of `count` floats, entry k in lane k."""
        pack, frm, scales, rounder = self._struct.pack, int.from_bytes, self.scales, repeat(ROUNDER)
        # v * 2**F_k + ROUNDER for each entry: what struct packs as BIAS + round(v * 2**F_k)
        return [frm(pack(*map(add, map(mul, v, scales), rounder)), "little") for v in vectors]

    def pack_columns(self, M: Sequence[Sequence[float]]) -> list[int]:
        """One int per column of M (M has `count` rows, row k for lane k): what pack(zip(*M)) gives,
        converting row by row."""
        fixed = [list(map(add, map(mul, row, repeat(scale)), repeat(ROUNDER))) for row, scale in zip(M, self.scales)]
        pack, frm = self._struct.pack, int.from_bytes
        return [frm(pack(*column), "little") for column in zip(*fixed)]

    def to_bytes(self, packed: Sequence[int]) -> bytes:
        """Packed ints as `count * width` bytes each, as `from_bytes` reads them back."""
        size = self.count * self.width
        return b"".join(value.to_bytes(size, "little") for value in packed)

    def from_bytes(self, data: bytes) -> list[int]:
        size, frm = self.count * self.width, int.from_bytes
        return [frm(data[at : at + size], "little") for at in range(0, len(data), size)]

    def unpack(self, total: int, weight_sum: int) -> list[float]:
        """The `count` floats in `total`, a sum of packed ints with integer weights adding to weight_sum."""
        raw = total.to_bytes(self.count * self.width, "little")
        frm, bias = int.from_bytes, BIAS * weight_sum
        return [(frm(raw[lane], "little") - bias) / denominator for lane, denominator in self._lanes]


# A magnitude at or above this is treated as infinite (floats will do): then no sum of the at most
# 2**23 values a lane holds can overflow, so a non-finite sum means a non-finite value, and the
# magnitudes of parts of a lane's values combine into the whole's by `max` (combine).
HUGE = 2.0**1000


def magnitudes(lanes: Iterable[Sequence[float]]) -> list[float]:
    """The largest |value| of each lane, given as the sequence of its values: inf for a lane holding
    an inf or a nan, or a value of HUGE or more."""
    return [_largest(values) for values in lanes]


def combine(parts: Iterable[Sequence[float]]) -> list[float]:
    """The magnitudes of whole lanes from those of their parts (each part's `magnitudes`, lane by
    lane): the same as `magnitudes` of the whole lanes, for any split of their values."""
    return [max(column) for column in zip(*parts)]


def _largest(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    if not math.isfinite(sum(values)):  # max() would skip a nan, depending on where it is
        return math.inf
    largest = max(max(values), -min(values))
    return largest if largest < HUGE else math.inf


def fits(largest: Iterable[float]) -> bool:
    """Whether lanes for values up to these magnitudes can be packed: each finite, and not so small
    (below 2**-900, though not zero) that 2**F_k overflows. When not, the caller computes with floats,
    which gives the same inf, nan or tiny numbers."""
    return all(m == 0.0 or (math.isfinite(m) and math.frexp(m)[1] > -900) for m in largest)
