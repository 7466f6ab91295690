"""Numerical gradient checking: the backward pass against central differences, for every parameter.

    dL/dp ~ (L(p + h) - L(p - h)) / 2h        error O(h^2)

on a small network with random sparse inputs. The relative error |g_analytic - g_numeric| /
(|g_analytic| + |g_numeric|), over the whole gradient vector, must be below 1e-6.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from parallel_nn.kernels.tensor import SparseMatrix
from parallel_nn.nn import network

TOLERANCE = 1e-6


@dataclass
class Result:
    relative_error: float
    worst_parameter: int
    parameters: int

    @property
    def passed(self) -> bool:
        return self.relative_error < TOLERANCE


def problem(seed: int = 0, sizes=(20, 8, 6, 4), examples: int = 12):
    """A small network and batch: pixels are 0 with probability 1/2, like MNIST's many zeros."""
    rng = random.Random(f"parallel_nn/gradcheck/{seed}")
    raw = bytes(rng.randrange(1, 256) if rng.random() < 0.5 else 0 for _ in range(examples * sizes[0]))
    X = SparseMatrix(raw, sizes[0])
    labels = [rng.randrange(sizes[-1]) for _ in range(examples)]
    params = network.he_init(list(sizes), seed)
    params = [p + rng.uniform(-0.1, 0.1) for p in params]  # non-zero biases too
    return list(sizes), params, X, labels


def check(seed: int = 0, h: float = 1e-5) -> Result:
    sizes, params, X, labels = problem(seed)

    def mean_loss(p):
        return network.predict(network.unflatten(p, sizes), X, labels)[0] / len(labels)

    grads, _, _ = network.loss_and_gradient(network.unflatten(params, sizes), X, labels)
    analytic = [g / len(labels) for g in network.flatten(grads)]
    numeric = []
    for k in range(len(params)):
        saved = params[k]
        params[k] = saved + h
        up = mean_loss(params)
        params[k] = saved - h
        down = mean_loss(params)
        params[k] = saved
        numeric.append((up - down) / (2 * h))
    difference = math.sqrt(sum((a - n) ** 2 for a, n in zip(analytic, numeric)))
    scale = math.sqrt(sum(a * a for a in analytic)) + math.sqrt(sum(n * n for n in numeric))
    worst = max(range(len(params)), key=lambda k: abs(analytic[k] - numeric[k]))
    return Result(difference / scale if scale else 0.0, worst, len(params))
