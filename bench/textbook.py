"""The textbook implementation: dense lists, index loops, nothing clever.

Two jobs: the speed baseline the benchmarks compare against (the shape of the original
single-process program), and an independent reference the tests check the package against. It
shares no code with parallel_nn on purpose: it decodes pixels, multiplies and differentiates by
the plain definitions.
"""

from __future__ import annotations

import math


def decode(images: bytes, indices, pixels: int = 784) -> list[list[float]]:
    return [[images[k * pixels + i] / 255.0 for i in range(pixels)] for k in indices]


def unflatten(params, sizes):
    layers, k = [], 0
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        W = [[params[k + j * fan_in + i] for i in range(fan_in)] for j in range(fan_out)]
        k += fan_in * fan_out
        layers.append((W, [params[k + j] for j in range(fan_out)]))
        k += fan_out
    return layers


def matmul(A, B):
    """C[n][m] = sum_k A[n][k] * B[k][m] with three loops."""
    n, inner, m = len(A), len(B), len(B[0])
    C = [[0.0] * m for _ in range(n)]
    for r in range(n):
        for c in range(m):
            total = 0.0
            for k in range(inner):
                total += A[r][k] * B[k][c]
            C[r][c] = total
    return C


def transpose(A):
    return [[A[r][c] for r in range(len(A))] for c in range(len(A[0]))]


def forward(layers, X):
    """Every layer's output, softmax probabilities last."""
    outputs, A = [], X
    for depth, (W, b) in enumerate(layers):
        Z = matmul(A, transpose(W))
        Z = [[z + b[j] for j, z in enumerate(row)] for row in Z]
        if depth < len(layers) - 1:
            A = [[z if z > 0 else 0.0 for z in row] for row in Z]
        else:
            A = []
            for row in Z:
                top = max(row)
                e = [math.exp(z - top) for z in row]
                A.append([v / sum(e) for v in e])
        outputs.append((Z, A))
    return outputs


def mean_loss_and_gradient(layers, X, labels):
    """(mean cross-entropy, [(dW, db)] of the mean) by the chain rule, layer by layer."""
    n = len(X)
    outputs = forward(layers, X)
    probs = outputs[-1][1]
    loss = -sum(math.log(probs[r][labels[r]]) for r in range(n)) / n
    dZ = [[(probs[r][j] - (1.0 if j == labels[r] else 0.0)) / n for j in range(len(probs[0]))] for r in range(n)]
    grads = []
    for depth in range(len(layers) - 1, -1, -1):
        A_in = X if depth == 0 else outputs[depth - 1][1]
        dW = matmul(transpose(dZ), A_in)
        db = [sum(dZ[r][j] for r in range(n)) for j in range(len(dZ[0]))]
        grads.append((dW, db))
        if depth > 0:
            W = layers[depth][0]
            dA = matmul(dZ, W)
            Z_prev = outputs[depth - 1][0]
            dZ = [[dA[r][i] * (1.0 if Z_prev[r][i] > 0 else 0.0) for i in range(len(dA[0]))] for r in range(n)]
    grads.reverse()
    return loss, grads


def predict(layers, X):
    probs = forward(layers, X)[-1][1]
    return [row.index(max(row)) for row in probs], probs


def sgd_step(layers, grads, lr):
    return [([[w - lr * g for w, g in zip(Wr, Gr)] for Wr, Gr in zip(W, dW)], [v - lr * g for v, g in zip(b, db)])
            for (W, b), (dW, db) in zip(layers, grads)]
