"""The model's maths: gradient checking, a numerically safe loss, and agreement with the textbook."""

import math
import random

import pytest

from bench import textbook
from parallel_nn.kernels import loops, tensor
from parallel_nn.kernels.tensor import SparseMatrix
from parallel_nn.nn import gradcheck, network


def test_gradcheck_passes():
    for seed in range(3):
        result = gradcheck.check(seed)
        assert result.passed, result


def test_gradcheck_catches_a_broken_relu_derivative(monkeypatch):
    # The original program's bug: a ReLU derivative of 1 everywhere.
    monkeypatch.setattr(network, "relu_backward", lambda dA, Z: dA)
    result = gradcheck.check(0)
    assert not result.passed and result.relative_error > 1e-3


def test_softmax_cross_entropy_is_stable():
    dZ, loss, predictions = network.softmax_cross_entropy([[1000.0, -1000.0, 0.0], [-800.0, 900.0, 5.0]], [1, 1])
    assert math.isfinite(loss) and loss == pytest.approx(2000.0)
    assert predictions == [0, 1]
    assert dZ[0] == pytest.approx([1.0, -1.0, 0.0]) and all(math.isfinite(v) for row in dZ for v in row)


def test_flatten_unflatten_and_init():
    sizes = [784, 32, 32, 10]
    params = network.he_init(sizes, 3)
    assert len(params) == network.parameter_count(sizes) == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert network.flatten(network.unflatten(params, sizes)) == params
    assert params == network.he_init(sizes, 3) and params != network.he_init(sizes, 4)
    first = params[: 784 * 32]
    std = math.sqrt(sum(w * w for w in first) / len(first))
    assert abs(std - math.sqrt(2 / 784)) < 0.05 * math.sqrt(2 / 784)  # He: variance 2 / fan_in
    with pytest.raises(ValueError):
        network.unflatten(params[:-1], sizes)


def batch(count=40, seed=0):
    rng = random.Random(seed)
    raw = bytes(rng.randrange(1, 256) if rng.random() < 0.2 else 0 for _ in range(count * 784))
    return raw, [rng.randrange(10) for _ in range(count)]


@pytest.mark.parametrize("kernels", [tensor, loops], ids=["idioms", "loops"])
def test_gradient_matches_the_textbook_implementation(kernels, monkeypatch):
    """Both kernel sets, whichever this interpreter picks by default (network.py imports them by name)."""
    for name in ("linear", "relu", "relu_backward", "weight_grad", "input_grad", "column_sums", "sparse_linear",
                 "sparse_weight_grad"):
        monkeypatch.setattr(network, name, getattr(kernels, name))
    sizes = [784, 16, 12, 10]
    params = network.he_init(sizes, 1)
    raw, labels = batch()
    X = SparseMatrix(raw, 784, kernels.sparse_rows)
    grads, loss, correct = network.loss_and_gradient(network.unflatten(params, sizes), X, labels)
    ref_loss, ref_grads = textbook.mean_loss_and_gradient(textbook.unflatten(params, sizes), textbook.decode(raw, range(len(labels))), labels)
    assert loss / len(labels) == pytest.approx(ref_loss, rel=1e-12)
    ours = [g / len(labels) for g in network.flatten(grads)]
    ref = network.flatten(ref_grads)
    scale = max(abs(r) for r in ref)
    assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1e-12 * scale
    predictions, _ = textbook.predict(textbook.unflatten(params, sizes), textbook.decode(raw, range(len(labels))))
    assert correct == sum(p == y for p, y in zip(predictions, labels))


def test_gradient_matches_numpy_when_available():
    np = pytest.importorskip("numpy")
    sizes = [784, 32, 32, 10]
    params = network.he_init(sizes, 2)
    raw, labels = batch(60, 5)
    grads, loss, _ = network.loss_and_gradient(network.unflatten(params, sizes), SparseMatrix(raw, 784), labels)
    X = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 784) / 255.0
    Ws, bs, k = [], [], 0
    for fi, fo in zip(sizes, sizes[1:]):
        Ws.append(np.array(params[k : k + fi * fo]).reshape(fo, fi)); k += fi * fo
        bs.append(np.array(params[k : k + fo])); k += fo
    As, Zs, A = [X], [], X
    for d, (W, b) in enumerate(zip(Ws, bs)):
        Z = A @ W.T + b
        Zs.append(Z)
        A = np.maximum(Z, 0) if d < len(Ws) - 1 else Z
        As.append(A)
    P = np.exp(Zs[-1] - Zs[-1].max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    Y = np.eye(10)[labels]
    dZ, ref = P - Y, []
    for d in range(len(Ws) - 1, -1, -1):
        ref = [dZ.T @ As[d], dZ.sum(0)] + ref
        if d:
            dZ = (dZ @ Ws[d]) * (Zs[d - 1] > 0)
    ref_flat = np.concatenate([r.ravel() for r in ref])
    assert np.max(np.abs(np.array(network.flatten(grads)) - ref_flat)) <= 1e-12 * np.abs(ref_flat).max()
    assert loss == pytest.approx(-np.log(P[np.arange(60), labels]).sum(), rel=1e-12)
