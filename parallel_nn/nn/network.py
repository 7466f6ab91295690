"""The network: fully connected ReLU layers and a softmax output, forward and backward.

Parameters live in one flat list (the layout of the shared-memory buffer): for each layer, W row
by row (`W[j][i]`, fan_out rows of fan_in, like torch.nn.Linear.weight), then b.

The first layer's input is a SparseMatrix of pixels; every later layer's input is a dense
Tensor2D. Everything else is one loop over the layers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from parallel_nn.kernels import column_sums, input_grad, linear, relu, relu_backward, sparse_linear, sparse_weight_grad, weight_grad
from parallel_nn.kernels.tensor import SparseMatrix, Tensor2D, Vector

Layer = tuple[Tensor2D, Vector]  # (W, b)


def layer_sizes(inputs: int, hidden: Sequence[int], outputs: int) -> list[int]:
    return [inputs, *hidden, outputs]


def parameter_count(sizes: Sequence[int]) -> int:
    return sum(fan_out * (fan_in + 1) for fan_in, fan_out in zip(sizes, sizes[1:]))


def he_init(sizes: Sequence[int], seed: int) -> list[float]:
    """W ~ N(0, 2 / fan_in) keeps the variance of ReLU activations constant through depth; b = 0."""
    rng = random.Random(f"parallel_nn/init/{seed}")
    params: list[float] = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        std = math.sqrt(2.0 / fan_in)
        params.extend(rng.gauss(0.0, std) for _ in range(fan_out * fan_in))
        params.extend([0.0] * fan_out)
    return params


def unflatten(params: Sequence[float], sizes: Sequence[int]) -> list[Layer]:
    layers, k = [], 0
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        W = [list(params[k + j * fan_in : k + (j + 1) * fan_in]) for j in range(fan_out)]
        k += fan_out * fan_in
        layers.append((W, list(params[k : k + fan_out])))
        k += fan_out
    if k != len(params):
        raise ValueError(f"{len(params)} parameters do not fit layer sizes {list(sizes)}")
    return layers


def flatten(layers: Sequence[Layer]) -> list[float]:
    params: list[float] = []
    for W, b in layers:
        for row in W:
            params.extend(row)
        params.extend(b)
    return params


def softmax_cross_entropy(Z: Tensor2D, labels: Sequence[int]) -> tuple[Tensor2D, float, list[int]]:
    """(dZ = Y_hat - Y, sum of -log Y_hat[y], predicted classes) for logits Z.

    Subtracting each row's max before exp() keeps it from overflowing; the loss is computed as
    log(sum exp(z - max)) - (z_y - max), which never takes log(0) however sure the network is.
    The gradient of softmax followed by cross-entropy is Y_hat - Y, so the softmax Jacobian is
    never formed.
    """
    dZ, loss, predictions = [], 0.0, []
    for z, y in zip(Z, labels):
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        loss += math.log(total) - (z[y] - top)
        p = [v / total for v in e]
        p[y] -= 1.0
        dZ.append(p)
        predictions.append(z.index(top))
    return dZ, loss, predictions


def forward(layers: Sequence[Layer], X: SparseMatrix, packed=None) -> tuple[list[Tensor2D], list]:
    """(pre-activations Z per layer, inputs A per layer) — the backward pass needs both. `packed`:
    the first layer's weights already packed into lanes (CPython's kernels; tensor.sparse_linear)."""
    A: SparseMatrix | Tensor2D = X
    Zs, As = [], []
    for depth, (W, b) in enumerate(layers):
        As.append(A)
        Z = sparse_linear(A, W, b, packed) if depth == 0 else linear(A, W, b)
        Zs.append(Z)
        if depth < len(layers) - 1:
            A = relu(Z)
    return Zs, As


def loss_and_gradient(layers: Sequence[Layer], X: SparseMatrix, labels: Sequence[int]) -> tuple[list[Layer], float, int]:
    """(per-layer (dW, db) summed over the batch, summed loss, number correct) — one forward pass.

    Sums, not means: a worker's shard sums add up to the whole batch's sum whatever the shard
    sizes, and the caller divides once by the batch size.
    """
    Zs, As = forward(layers, X)
    return backward(layers, Zs, As, labels)


def backward(layers: Sequence[Layer], Zs: list[Tensor2D], As: list, labels: Sequence[int]) -> tuple[list[Layer], float, int]:
    """loss_and_gradient after its forward pass: the loss, then one loop over the layers, last to first."""
    dZ, loss, predictions = softmax_cross_entropy(Zs[-1], labels)
    correct = sum(p == y for p, y in zip(predictions, labels))
    grads: list[Layer] = []
    for depth in range(len(layers) - 1, -1, -1):
        W, _ = layers[depth]
        A = As[depth]
        dW = sparse_weight_grad(dZ, A) if depth == 0 else weight_grad(dZ, A)
        grads.append((dW, column_sums(dZ)))
        if depth > 0:
            dA = input_grad(dZ, W)  # dA[n][i] = sum_j dZ[n][j] * W[j][i]
            dZ = relu_backward(dA, Zs[depth - 1])
    grads.reverse()
    return grads, loss, correct


def predict(layers: Sequence[Layer], X: SparseMatrix, labels: Sequence[int]) -> tuple[float, list[int]]:
    """(summed cross-entropy, predicted class per example)."""
    Zs, _ = forward(layers, X)
    _, loss, predictions = softmax_cross_entropy(Zs[-1], labels)
    return loss, predictions


@dataclass
class Model:
    """Layer sizes plus flat parameters: what a weights file holds."""

    sizes: list[int]
    params: list[float]
