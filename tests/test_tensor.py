"""Every kernel, in both variants (tensor.py's C idioms and loops.py's plain loops for the JIT),
against its plain definition; the broadcasting ops against element-by-element loops."""

import math
import random
import struct
from array import array

import pytest

from parallel_nn.kernels import lanes, loops, tensor
from parallel_nn.kernels.tensor import SparseMatrix


def rand_matrix(rows, cols, rng, zeros=0.0):
    return [[0.0 if rng.random() < zeros else rng.uniform(-1, 1) for _ in range(cols)] for _ in range(rows)]


def plain_matmul(A, B):
    return [[sum(A[n][k] * B[k][m] for k in range(len(B))) for m in range(len(B[0]))] for n in range(len(A))]


def close(A, B, rel=1e-12):
    flat_a = [x for row in A for x in row]
    flat_b = [x for row in B for x in row]
    scale = max(1e-300, max(abs(x) for x in flat_b))
    return len(flat_a) == len(flat_b) and max(abs(a - b) for a, b in zip(flat_a, flat_b)) <= rel * scale


@pytest.fixture
def rng():
    return random.Random(7)


def test_matmul_and_transpose(rng):
    A, B = rand_matrix(4, 6, rng), rand_matrix(6, 3, rng)
    assert close(tensor.matmul(A, B), plain_matmul(A, B))
    assert tensor.transpose(A) == [[A[r][c] for r in range(4)] for c in range(6)]
    with pytest.raises(ValueError):
        tensor.matmul(A, A)


@pytest.mark.parametrize("op, f", [(tensor.add, lambda a, b: a + b), (tensor.sub, lambda a, b: a - b),
                                   (tensor.mul_elementwise, lambda a, b: a * b), (tensor.div, lambda a, b: a / b)])
def test_broadcasting(op, f, rng):
    A = rand_matrix(3, 4, rng)
    B = [[rng.uniform(1, 2) for _ in range(4)] for _ in range(3)]
    row, column, scalar = [B[0]], [[r[0]] for r in B], 1.5
    assert op(A, B) == [[f(A[i][j], B[i][j]) for j in range(4)] for i in range(3)]
    assert op(A, row) == [[f(A[i][j], row[0][j]) for j in range(4)] for i in range(3)]
    assert op(A, column) == [[f(A[i][j], column[i][0]) for j in range(4)] for i in range(3)]
    assert op(A, scalar) == [[f(A[i][j], scalar) for j in range(4)] for i in range(3)]
    assert op(scalar, B) == [[f(scalar, B[i][j]) for j in range(4)] for i in range(3)]
    with pytest.raises(ValueError):
        op(A, [[1.0, 2.0]])


KERNELS = pytest.mark.parametrize("k", [tensor, loops], ids=["idioms", "loops"])


@KERNELS
def test_dense_kernels(rng, k):
    A, W, b = rand_matrix(7, 5, rng), rand_matrix(3, 5, rng), [rng.uniform(-1, 1) for _ in range(3)]
    expected = [[sum(A[n][i] * W[j][i] for i in range(5)) + b[j] for j in range(3)] for n in range(7)]
    assert close(k.linear(A, W, b), expected)
    dZ = rand_matrix(7, 3, rng)
    assert close(k.weight_grad(dZ, A), [[sum(dZ[n][j] * A[n][i] for n in range(7)) for i in range(5)] for j in range(3)])
    assert close(k.input_grad(dZ, W), [[sum(dZ[n][j] * W[j][i] for j in range(3)) for i in range(5)] for n in range(7)])
    assert close([k.column_sums(dZ)], [[sum(dZ[n][j] for n in range(7)) for j in range(3)]])
    Z = rand_matrix(7, 3, rng)
    Z[0][0] = 0.0  # the derivative at exactly zero is zero
    assert k.relu(Z) == [[max(z, 0.0) for z in row] for row in Z]
    assert k.relu_backward(dZ, Z) == [[d if z > 0 else 0.0 for d, z in zip(dr, zr)] for dr, zr in zip(dZ, Z)]


@KERNELS
def test_update_and_buffer_kernels(rng, k):
    params, v, grad = ([rng.uniform(-1, 1) for _ in range(50)] for _ in range(3))
    lr, mu, scale = 0.1, 0.9, 1 / 7
    assert k.sgd_update(params, grad, lr, scale) == [p - lr * (g * scale) for p, g in zip(params, grad)]
    new_v = [mu * vi + g * scale for vi, g in zip(v, grad)]
    assert k.momentum_update(params, v, grad, lr, mu, scale, False) == ([p - lr * vi for p, vi in zip(params, new_v)], new_v)
    nesterov = [p - lr * (g * scale + mu * vi) for p, g, vi in zip(params, grad, new_v)]
    assert k.momentum_update(params, v, grad, lr, mu, scale, True) == (nesterov, new_v)
    raw = array("d", params).tobytes()
    assert list(k.floats(raw)) == params and list(k.floats(memoryview(raw).cast("d"))) == params
    total = list(params)
    k.add_into(total, grad)
    assert total == [p + g for p, g in zip(params, grad)]


def sparse_case(rng, rows=9, width=30):
    raw = bytearray(rng.randrange(1, 256) if rng.random() < 0.3 else 0 for _ in range(rows * width))
    raw[0:width] = bytes(width)                # an all-zero row
    raw[width : 2 * width] = bytes(width)
    raw[width + 4] = 200                       # a row with a single non-zero
    for r in range(rows):                      # an all-zero column, and a column with one non-zero
        raw[r * width + 7] = 0
        raw[r * width + 8] = 0
    raw[3 * width + 8] = 17
    return SparseMatrix(bytes(raw), width)


@KERNELS
def test_sparse_views_and_kernels(rng, k):
    X = sparse_case(rng)
    X = SparseMatrix(X.raw, X.width, k.sparse_rows)
    levels = [X.raw[r * X.width : (r + 1) * X.width] for r in range(X.height)]
    dense = [[b / 255.0 for b in row] for row in levels]
    assert X.dense() == dense
    assert X.rows == [([i for i, v in enumerate(r) if v], bytes(v for v in r if v)) for r in levels]
    assert X.columns == [(i, [n for n in range(X.height) if levels[n][i]], bytes(r[i] for r in levels if r[i]))
                         for i in range(X.width) if any(r[i] for r in levels)]
    W, b = rand_matrix(4, X.width, rng), [rng.uniform(-1, 1) for _ in range(4)]
    assert close(k.sparse_linear(X, W, b), plain_matmul_bias(dense, W, b))
    dZ = rand_matrix(X.height, 4, rng)
    expected = [[sum(dZ[n][j] * dense[n][i] for n in range(X.height)) for i in range(X.width)] for j in range(4)]
    assert close(k.sparse_weight_grad(dZ, X), expected)
    with pytest.raises(ValueError):
        SparseMatrix(b"abc", 2)


def plain_matmul_bias(A, W, b):
    return [[sum(a[i] * W[j][i] for i in range(len(a))) + b[j] for j in range(len(W))] for a in A]


def test_decoders_agree(rng):
    raw = sparse_case(rng, rows=40, width=50).raw
    assert loops.sparse_rows(raw, 50) == tensor.sparse_rows(raw, 50)
    assert tensor.sparse_rows(b"", 50) == [] and tensor.sparse_rows(bytes(6), 3) == [([], b""), ([], b"")]


@pytest.mark.parametrize("scale", [1.0, 1e6, 1e-200, 0.0])
def test_lanes_round_trip_sums_of_weighted_vectors(rng, scale):
    vectors = [[rng.uniform(-1, 1) * scale for _ in range(5)] for _ in range(30)]
    vectors[3] = [scale, -scale, 0.0, scale / 3, -scale / 7]  # the largest magnitude, both signs
    weights = [rng.randrange(256) for _ in vectors]
    layout = lanes.Lanes(lanes.magnitudes(zip(*vectors)), 255 * len(vectors), 255)
    got = layout.unpack(sum(w * p for w, p in zip(weights, layout.pack(vectors))), sum(weights))
    expected = [sum(w / 255 * v[k] for w, v in zip(weights, vectors)) for k in range(5)]
    assert max(abs(g - e) for g, e in zip(got, expected)) <= 1e-14 * max(scale, 1e-300) * sum(weights) / 255
    assert layout.pack_columns([list(c) for c in zip(*vectors)]) == layout.pack(vectors)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e-310])
def test_sparse_kernels_fall_back_to_floats_for_what_lanes_cannot_hold(rng, bad):
    X = sparse_case(rng)
    W = rand_matrix(4, X.width, rng) if bad != 1e-310 else [[1e-310] * X.width for _ in range(4)]
    W[1][5] = bad
    dense = X.dense()
    expected = plain_matmul_bias(dense, W, [0.0] * 4)
    got = tensor.sparse_linear(X, W, [0.0] * 4)
    assert [[math.isnan(v) for v in row] for row in got] == [[math.isnan(v) for v in row] for row in expected]
    # the same infinities; finite values as the float kernels give them (3.12+'s sumprod rounds unlike sum)
    assert all(g == e or math.isnan(e) or abs(g - e) <= 1e-12 * abs(e) for gr, er in zip(got, expected) for g, e in zip(gr, er))
    dZ = [[bad if (n, j) == (3, 2) else rng.uniform(-1, 1) for j in range(4)] for n in range(X.height)]
    got = tensor.sparse_weight_grad(dZ, X)
    assert [[math.isnan(v) for v in row] for row in got] == [[math.isnan(v) for v in row] for row in tensor.weight_grad(dZ, dense)]


@pytest.mark.parametrize("odd", [None, math.nan, math.inf, -math.inf, 2.0**1000, -(2.0**1000) * 0.999, 1e308, 1e-310])
def test_magnitudes_of_parts_combine_into_the_wholes_for_any_split(rng, odd):
    """Workers that share the first layer's packing each scan their own columns (worker.share_lanes):
    the combined magnitudes, and so the layout or the fall-back to floats, must be what one scan of
    the whole rows gives, wherever the rows are split and whatever they hold."""
    rows = [[rng.uniform(-1, 1) * 10.0 ** rng.randrange(-5, 5) for _ in range(50)] for _ in range(4)]
    if odd is not None:
        rows[1][rng.randrange(50)] = odd
        rows[2] = [odd if k % 7 == 0 else v for k, v in enumerate(rows[2])]  # many: sums that could overflow
    whole = lanes.magnitudes(rows)
    for parts in (1, 2, 3, 7, 50, 64):
        cuts = [len(rows[0]) * k // parts for k in range(parts + 1)]
        posted = [lanes.magnitudes([r[a:b] for r in rows]) for a, b in zip(cuts, cuts[1:])]
        assert lanes.combine(posted) == whole, (parts, posted, whole)
    assert lanes.fits(whole) == (odd is None or (math.isfinite(odd) and abs(odd) < 2.0**1000))  # 1e-310 among larger: fits


def test_the_rounder_turns_floats_into_biased_integers(rng):
    """x + ROUNDER packed as a double reads back as BIAS + round(x), for every |x| < 2**51."""
    edges = [0.0, 0.5, 1.5, -0.5, -2.5, 2.0**51 - 0.25, -(2.0**51) + 0.25, 2.0**50 + 0.5]
    for x in edges + [rng.uniform(-(2.0**51), 2.0**51) for _ in range(1000)]:
        bits = int.from_bytes(struct.pack("<d", x + lanes.ROUNDER), "little")
        assert bits == lanes.BIAS + round(x), x


# ---- the lanes' precision is per output, whatever the other outputs' magnitudes ----
#
# The contract: each output of the lane kernels agrees with the plain definition to 1e-12 of that
# output's own scale, for any finite weights. Precisely, for Z[n][j] = sum_i x[n][i] W[j][i] + b[j]
#     |lanes - exact| <= 1e-12 * (sum_i x[n][i] * max_i |W[j][i]| + |b[j]|)
# (the most its sum could be for these inputs, given its own weights: lane j's fixed point is exact
# to 2**-52 of max_i |W[j][i]|, whatever the other lanes hold), and, for outputs whose own weights
# have no outlier, the bound of a float sum, 1e-12 * (sum_i |x[n][i] W[j][i]| + |b[j]|). Likewise
# dW[j][i] = sum_n dZ[n][j] x[n][i], with column j of dZ as lane j. `exact` is math.fsum of the terms.
# (An output with one weight of 1e8 among 0.05s, on an image that leaves that pixel dark, is only
# within the first bound: its lane's precision is 2**-52 of 1e8.)

def he_matrix(rows, cols, rng, sigma=0.05):
    return [[rng.gauss(0.0, sigma) for _ in range(cols)] for _ in range(rows)]


def put(M, r, c, value):
    M[r][c] = value


def scale_rows(M, factors):
    for r, f in factors.items():
        M[r] = [v * f for v in M[r]]


def scale_columns(M, factors):
    for row in M:
        for c, f in factors.items():
            row[c] *= f


ALL = {0, 1, 2, 3}
# (how W, 4 outputs x pixels, is made adversarial in place; the outputs given an outlying weight)
ADVERSARIAL_WEIGHTS = {
    "one 1e3": (lambda W: put(W, 1, 5, 1e3), {1}),
    "one 1e8": (lambda W: put(W, 1, 5, 1e8), {1}),
    "one -1e300": (lambda W: put(W, 1, 5, -1e300), {1}),
    "one 1e-8": (lambda W: put(W, 1, 5, 1e-8), {1}),
    "an output tiny, another huge": (lambda W: scale_rows(W, {0: 1e-8, 2: 1e8}), set()),
    "an output 1e-200, another 1e200": (lambda W: scale_rows(W, {0: 1e-200, 2: 1e200}), set()),
    "an output below the lanes' range": (lambda W: scale_rows(W, {0: 1e-300}), set()),  # floats then
    "an output all zero": (lambda W: scale_rows(W, {3: 0.0}), set()),
    "a pixel tiny, another huge": (lambda W: scale_columns(W, {5: 1e-8, 6: 1e8}), ALL),
}
# the same for dZ, examples x 4 outputs
ADVERSARIAL_GRADIENTS = {
    "one 1e3": (lambda dZ: put(dZ, 3, 1, 1e3), {1}),
    "one 1e8": (lambda dZ: put(dZ, 3, 1, 1e8), {1}),
    "one -1e300": (lambda dZ: put(dZ, 3, 1, -1e300), {1}),
    "one 1e-8": (lambda dZ: put(dZ, 3, 1, 1e-8), {1}),
    "an output tiny, another huge": (lambda dZ: scale_columns(dZ, {0: 1e-8, 2: 1e8}), set()),
    "an output 1e-200, another 1e200": (lambda dZ: scale_columns(dZ, {0: 1e-200, 2: 1e200}), set()),
    "an output below the lanes' range": (lambda dZ: scale_columns(dZ, {0: 1e-300}), set()),
    "a dead output (all zero)": (lambda dZ: scale_columns(dZ, {3: 0.0}), set()),
    "an example tiny, another huge": (lambda dZ: scale_rows(dZ, {3: 1e-8, 4: 1e8}), ALL),
}


def assert_per_output(got, terms_of, uneven, bias=None):
    """got[r][c] against math.fsum of x * w over terms_of(r, c), the (x, w) pairs of every input,
    lit or not (+ bias[c]). Column c is output c, lane c; `uneven` are the lanes given an outlier."""
    for r, row in enumerate(got):
        for c, value in enumerate(row):
            pairs = terms_of(r, c)
            b = bias[c] if bias else 0.0
            exact = math.fsum([x * w for x, w in pairs] + [b])
            lane_scale = math.fsum(x for x, _ in pairs) * max(abs(w) for _, w in pairs) + abs(b)
            error = abs(value - exact)
            assert error <= 1e-12 * lane_scale, (r, c, value, exact, error / lane_scale)
            if c not in uneven:
                term_scale = math.fsum([abs(x * w) for x, w in pairs] + [abs(b)])
                assert error <= 1e-12 * term_scale, (r, c, value, exact, error / term_scale)


@pytest.mark.parametrize("case", ADVERSARIAL_WEIGHTS)
def test_sparse_linear_precision_is_per_output(rng, case):
    X = sparse_case(rng, rows=12, width=120)
    W = he_matrix(4, X.width, rng)
    make_adversarial, uneven = ADVERSARIAL_WEIGHTS[case]
    make_adversarial(W)
    b = [rng.gauss(0.0, 1.0) * sorted(map(abs, row))[len(row) // 2] for row in W]  # of each output's own size
    x = X.dense()
    got = tensor.sparse_linear(X, W, b)
    assert_per_output(got, lambda n, j: list(zip(x[n], W[j])), uneven, b)


@pytest.mark.parametrize("case", ADVERSARIAL_GRADIENTS)
def test_sparse_weight_grad_precision_is_per_output(rng, case):
    X = sparse_case(rng, rows=40, width=30)
    dZ = he_matrix(X.height, 4, rng, sigma=0.01)
    make_adversarial, uneven = ADVERSARIAL_GRADIENTS[case]
    make_adversarial(dZ)
    x = X.dense()
    dWT = tensor.transpose(tensor.sparse_weight_grad(dZ, X))  # dWT[i][j]: output j in column j, as in Z
    assert_per_output(dWT, lambda i, j: [(x[n][i], dZ[n][j]) for n in range(X.height)], uneven)


# ---- the lanes' width: the worst-case sum fills a lane at the width boundaries ----
#
# A lane holds sum_t weight_t * (BIAS + q_t), with q_t = round(v_t * 2**F) reaching +-2**51 for v just
# below a power of two and the weights adding up to weight_limit: at most weight_limit * 1076 * 2**52
# (BIAS + 2**51 = 1076 * 2**52). The worst case is every value at +-magnitude and every weight at its
# maximum. Its width, ceil((63 + weight_limit.bit_length()) / 8) bytes, is then full to the last bit
# at weight_limit = 511, 131071, 33554431 (bit length 9, 17, 25: just below the power of two where
# the width grows), so a lane one byte narrower overflows there; a width computed from one bit less
# is a byte narrower at bit length 10, 18, 26, and overflows at the top of those (1020, 1023, 262143).
# FIXED_BITS one larger puts x + ROUNDER beyond 2**53, where the doubles are no longer the integers.
# So: every weight_limit just below, at and above each power of two up to 2**27, and the kernels'.

BELOW_ONE = math.nextafter(1.0, 0.0)  # rounds to q = 2**51, the largest fixed-point value
EXTREMES = [BELOW_ONE, 1.0, 0.75, 3.0e-5 * BELOW_ONE, 7.0e20]
SIGNS = {"all +max": [1, 1, 1, 1, 1], "all -max": [-1, -1, -1, -1, -1],
         "alternating": [1, -1, 1, -1, 1], "alternating from -": [-1, 1, -1, 1, -1]}
WEIGHT_LIMITS = sorted({w for k in range(1, 28) for w in (2**k - 1, 2**k, 2**k + 1)}
                       | {255 * 4, 255 * 500, 255 * 514, 255 * 784})


@pytest.mark.parametrize("weight_limit", WEIGHT_LIMITS)
def test_lanes_hold_the_worst_case_sum_at_every_width(weight_limit):
    for magnitudes in [[m] * 5 for m in EXTREMES] + [EXTREMES, EXTREMES[::-1]]:  # and each lane its own
        for signs in SIGNS.values():
            vector = [s * m for s, m in zip(signs, magnitudes)]
            layout = lanes.Lanes(magnitudes, weight_limit, 255)
            (packed,) = layout.pack([vector])
            # weight 255 as often as it fits, then the remainder: weights adding up to weight_limit
            total = (weight_limit // 255) * (255 * packed) + (weight_limit % 255) * packed
            got = layout.unpack(total, weight_limit)
            expected = [weight_limit * v / 255 for v in vector]  # sum_t (weight_t / 255) * v
            assert all(abs(g - e) <= 1e-12 * abs(e) for g, e in zip(got, expected)), (magnitudes, signs, got, expected)


@pytest.mark.parametrize("images, pixels", [(4, 4), (4, 3), (500, 2), (514, 1), (1, 784), (1, 1028)])
def test_sparse_kernels_on_saturated_shards(images, pixels):
    """Every pixel 255 in every image (4 images: weight_limit 1020, just below 2**10), every weight and
    gradient at the largest magnitude: each lane's sum has the largest total weight its layout allows."""
    X = SparseMatrix(b"\xff" * (images * pixels), pixels)
    for magnitude in (BELOW_ONE, 1.0):
        for signs in SIGNS.values():
            W = [[s * magnitude] * pixels for s in signs]
            expected = [[pixels * s * magnitude for s in signs]] * images
            assert close(tensor.sparse_linear(X, W, [0.0] * len(signs)), expected)
            dZ = [[s * magnitude for s in signs]] * images
            assert close(tensor.sparse_weight_grad(dZ, X), [[images * s * magnitude] * pixels for s in signs])
