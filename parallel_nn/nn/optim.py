"""Update rules and learning-rate schedules over flat parameter lists.

Each optimizer's state is a dict of flat lists and counters, so a checkpoint stores it as JSON and
a resumed run continues with exactly the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

from parallel_nn.kernels import momentum_update, sgd_update

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.15, "adam": 0.001}  # nesterov 0.15: measured (docs/accuracy.md)
SCHEDULES = ("constant", "step", "cosine", "onecycle")
STATE_VECTORS = {"sgd": (), "momentum": ("v",), "nesterov": ("v",), "adam": ("m", "s")}  # per-parameter state


class Optimizer:
    """param <- param - lr * grad, plus whatever the rule keeps between steps."""

    def __init__(self, name: str, size: int, momentum: float = 0.9, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}")
        self.name, self.momentum, self.betas, self.eps, self.weight_decay = name, momentum, betas, eps, weight_decay
        self.state: dict[str, Any] = {"t": 0, **{key: [0.0] * size for key in STATE_VECTORS[name]}}

    def step(self, params: list[float], grad: list[float], lr: float, scale: float = 1.0) -> list[float]:
        """The new parameters (params itself is left alone) for the gradient `scale * grad`.

        `scale` lets the trainer pass the workers' summed gradient with 1 / batch size, saving a
        pass over every parameter on the parent's serial path.
        """
        self.state["t"] += 1
        if self.weight_decay:  # L2 penalty wd/2 * |w|^2, added to the gradient (biases included, for simplicity)
            wd = self.weight_decay
            grad, scale = [g * scale + wd * p for g, p in zip(grad, params)], 1.0
        if self.name == "sgd":
            return sgd_update(params, grad, lr, scale)
        if self.name in ("momentum", "nesterov"):
            # v = mu v + g; p -= lr v (PyTorch's convention), or for Nesterov p -= lr (g + mu v)
            params, self.state["v"] = momentum_update(params, self.state["v"], grad, lr, self.momentum, scale,
                                                      self.name == "nesterov")
            return params
        if scale != 1.0:
            grad = [g * scale for g in grad]
        beta1, beta2 = self.betas
        t = self.state["t"]
        m = self.state["m"] = [beta1 * mi + (1 - beta1) * g for mi, g in zip(self.state["m"], grad)]
        s = self.state["s"] = [beta2 * si + (1 - beta2) * g * g for si, g in zip(self.state["s"], grad)]
        # bias correction folded into the step size, as in the Adam paper's efficient form
        step = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        eps = self.eps
        return [p - step * mi / (math.sqrt(si) + eps) for p, mi, si in zip(params, m, s)]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved state, or ValueError saying what in it cannot be this optimizer's."""
        missing = set(self.state) - set(state)
        if missing:
            raise ValueError(f"optimizer state lacks {sorted(missing)}")
        for key, value in self.state.items():
            if isinstance(value, list) != isinstance(state[key], list):
                raise ValueError(f"optimizer state {key!r} must be {'a list' if isinstance(value, list) else 'a number'}")
            if isinstance(value, list) and len(state[key]) != len(value):
                raise ValueError(f"optimizer state {key!r} has {len(state[key])} values, expected {len(value)}")
        t = state["t"]
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 0):
            raise ValueError(f"optimizer state 't' must be a whole number of steps >= 0, not {t!r}")
        if "s" in state and any(not si >= 0 for si in state["s"]):  # Adam's mean of squares
            raise ValueError("optimizer state 's' must hold no negative number")
        self.state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}


def learning_rate(base: float, schedule: str, epoch: int, step: int, steps_per_epoch: int, epochs: int,
                  decay_at: float = 0.7, factor: float = 0.1) -> float:
    """The rate for step `step` of epoch `epoch` (both from 0): a pure function, so resume needs no state.

    step:     base until decay_at of the run, then base * factor (changes at an epoch boundary)
    cosine:   base * (1 + cos(pi * progress)) / 2, progress measured in steps over the whole run
    onecycle: a linear warm-up from base / 25 to base over the first 30% of the steps, then cosine
              down to 0 over the rest (Smith's one-cycle policy, without its momentum cycle)
    """
    if schedule == "constant":
        return base
    if schedule == "step":
        return base * factor if epoch >= math.ceil(decay_at * epochs) and epochs > 1 else base
    if schedule == "cosine":
        progress = (epoch * steps_per_epoch + step) / max(1, epochs * steps_per_epoch)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        progress = (epoch * steps_per_epoch + step) / max(1, epochs * steps_per_epoch)
        if progress < 0.3:
            return base / 25 + (base - base / 25) * progress / 0.3
        return base * 0.5 * (1.0 + math.cos(math.pi * (progress - 0.3) / 0.7))
    raise ValueError(f"unknown schedule {schedule!r}")
