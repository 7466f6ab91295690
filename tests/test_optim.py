"""Update rules against their formulas; schedules as pure functions of the position in the run."""

import math

import pytest

from parallel_nn.nn.optim import Optimizer, learning_rate


def test_sgd_and_weight_decay():
    assert Optimizer("sgd", 2).step([1.0, 2.0], [0.5, -1.0], 0.1) == pytest.approx([0.95, 2.1])
    assert Optimizer("sgd", 1, weight_decay=0.5).step([2.0], [0.0], 0.1) == pytest.approx([1.9])


def test_scale_is_the_same_as_a_scaled_gradient():
    for name in ("sgd", "momentum", "nesterov", "adam"):
        a, b = Optimizer(name, 2, weight_decay=0.01), Optimizer(name, 2, weight_decay=0.01)
        for _ in range(3):
            pa = a.step([1.0, -2.0], [0.25 * 8, -1.5 * 8], 0.1, scale=1 / 8)
            pb = b.step([1.0, -2.0], [0.25, -1.5], 0.1)
        assert pa == pytest.approx(pb, rel=1e-15)


def test_momentum_and_nesterov_two_steps():
    opt = Optimizer("momentum", 1, momentum=0.9)
    p = opt.step([1.0], [1.0], 0.1)            # v = 1,    p = 1 - 0.1
    p = opt.step(p, [1.0], 0.1)                # v = 1.9,  p = 0.9 - 0.19
    assert p == pytest.approx([0.71])
    nes = Optimizer("nesterov", 1, momentum=0.9)
    p = nes.step([1.0], [1.0], 0.1)            # v = 1, step g + mu v = 1.9
    assert p == pytest.approx([1.0 - 0.19])


def test_adam_first_step_is_lr_sized():
    opt = Optimizer("adam", 2)
    p = opt.step([0.0, 0.0], [3.0, -0.001], 0.01)
    assert p == pytest.approx([-0.01, 0.01], rel=1e-3)  # bias-corrected m / sqrt(s) = sign(g)
    step = 0.01 * math.sqrt(1 - 0.999) / (1 - 0.9)  # the paper's efficient form, eps outside the correction
    assert p == pytest.approx([-step * 0.1 * g / (math.sqrt(0.001 * g * g) + 1e-8) for g in (3.0, -0.001)], rel=1e-12)


def test_state_roundtrip_and_validation():
    opt = Optimizer("adam", 3)
    opt.step([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 0.01)
    again = Optimizer("adam", 3)
    again.load_state_dict(opt.state_dict())
    assert again.step([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 0.01) == opt.step([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], 0.01)
    with pytest.raises(ValueError):
        Optimizer("adam", 4).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError):
        Optimizer("rmsprop", 1)


def test_schedules():
    assert learning_rate(0.1, "constant", 9, 5, 10, 10) == 0.1
    assert [learning_rate(0.1, "step", e, 0, 10, 10) for e in (0, 6, 7, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert learning_rate(0.1, "step", 0, 0, 10, 1) == 0.1  # a one-epoch run never decays
    assert learning_rate(0.1, "cosine", 0, 0, 10, 10) == 0.1
    assert learning_rate(0.1, "cosine", 5, 0, 10, 10) == pytest.approx(0.05)
    assert learning_rate(0.1, "cosine", 9, 9, 10, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert learning_rate(0.1, "onecycle", 0, 0, 10, 10) == pytest.approx(0.004)  # warm-up starts at base / 25
    assert learning_rate(0.1, "onecycle", 3, 0, 10, 10) == pytest.approx(0.1)  # the peak, at 30% of the steps
    assert learning_rate(0.1, "onecycle", 1, 5, 10, 10) == pytest.approx(0.004 + 0.096 * 0.15 / 0.3)
    assert learning_rate(0.1, "onecycle", 9, 9, 10, 10) < 0.001  # annealed to ~0 by the end
