"""Speed benchmarks: `pytest --benchmark-only` (or `make bench`). Compare ratios within a group.

Groups:
  step        one training step at batch 500 in one process: the textbook triple loop vs our kernels
  parallel    one data-parallel step (gradient + update) at batch 500 for 1, 2, 4 and 8 workers
              (and 8 with --reduce workers)
  parent      the parent's serial work per step at 8 workers: combining 8 gradient slots, the update;
              and the line the live page reads, appended to progress.jsonl after every step
  trace       the 2-worker step with --trace recording every span, and without
  evaluate    the 10,000 test images, in-process and across 2 workers
  load        reading + validating the IDX files; decoding one batch of 500 from bytes
"""

from __future__ import annotations

import random

import pytest

from bench import textbook
from parallel_nn.data import mnist
from parallel_nn.nn import network
from parallel_nn.nn.network import he_init, parameter_count
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.local.pool import LocalEngine as Engine

SIZES = [784, 32, 32, 10]
BATCH = 500


def batch_indices(step: int, count: int = 60000) -> list[int]:
    return random.Random(step).sample(range(count), BATCH)


@pytest.mark.benchmark(group="step")
def test_step_textbook_triple_loop(benchmark, mnist_data):
    train = mnist_data[0]
    layers = textbook.unflatten(he_init(SIZES, 0), SIZES)
    indices = batch_indices(0)

    def step():
        X = textbook.decode(train.images, indices)
        _, grads = textbook.mean_loss_and_gradient(layers, X, [train.labels[k] for k in indices])
        return textbook.sgd_step(layers, grads, 0.1)

    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.benchmark(group="step")
def test_step_parallel_nn_kernels(benchmark, mnist_data):
    train = mnist_data[0]
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    indices = batch_indices(0)

    def step():
        grads, _, _ = network.loss_and_gradient(network.unflatten(params, SIZES), mnist.decode_batch(train.images, indices),
                                                [train.labels[k] for k in indices])
        return optimizer.step(params, [g / BATCH for g in network.flatten(grads)], 0.1)

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="parallel")
@pytest.mark.parametrize("workers, reduce", [(1, "parent"), (2, "parent"), (4, "parent"), (8, "parent"), (8, "workers")])
def test_data_parallel_step(benchmark, mnist_data, workers, reduce):
    train, test, _ = mnist_data
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with Engine(SIZES, train, test, workers, reduce=reduce) as engine:
        engine.set_params(params)
        state = {"step": 0, "params": params}

        def step():
            grad, _, _ = engine.gradient(batch_indices(state["step"]))
            state["params"] = optimizer.step(state["params"], [g / BATCH for g in grad], 0.1)
            engine.set_params(state["params"])
            state["step"] += 1

        benchmark.pedantic(step, rounds=12, iterations=1, warmup_rounds=2)


@pytest.mark.benchmark(group="trace")
@pytest.mark.parametrize("traced", [False, True], ids=["off", "on"])
def test_data_parallel_step_with_tracing(benchmark, mnist_data, traced, tmp_path):
    """--trace's cost: the same 2-worker step with every span recorded and shipped back, or not."""
    from parallel_nn.parallel.trace import NoTracer, Tracer

    train, test, _ = mnist_data
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    tracer = Tracer(tmp_path / "trace.json") if traced else NoTracer()
    tracer.active = traced
    with Engine(SIZES, train, test, 2) as engine:
        engine.tracer = tracer
        engine.set_params(params)
        state = {"step": 0, "params": params}

        def step():
            with tracer.span("step"):
                grad, _, _ = engine.gradient(batch_indices(state["step"]))
                with tracer.span("update"):
                    state["params"] = optimizer.step(state["params"], grad, 0.1, 1 / BATCH)
                    engine.set_params(state["params"])
            state["step"] += 1

        benchmark.pedantic(step, rounds=60, iterations=1, warmup_rounds=10)


@pytest.mark.benchmark(group="parent")
def test_parent_combines_8_slots(benchmark):
    from operator import add

    size = parameter_count(SIZES)
    rng = random.Random(0)
    slots = [[rng.random() for _ in range(size)] for _ in range(8)]

    def combine():
        total = slots[0]
        for part in slots[1:]:
            total = list(map(add, total, part))
        return total

    benchmark(combine)


@pytest.mark.benchmark(group="parent")
def test_parent_momentum_update(benchmark):
    size = parameter_count(SIZES)
    params, grad = he_init(SIZES, 0), [1e-3] * size
    optimizer = Optimizer("momentum", size)
    benchmark(lambda: optimizer.step(params, [g / BATCH for g in grad], 0.1))


@pytest.mark.benchmark(group="parent")
def test_parent_writes_the_progress_line(benchmark, tmp_path):
    """What the live page costs the trainer: the line steplog.StepLog appends to progress.jsonl
    after every step (json, one write, one flush), next to the parent's other per-step work."""
    from types import SimpleNamespace

    from parallel_nn.events import StepDone
    from parallel_nn.run.steplog import StepLog

    log = StepLog(print)
    log.started(SimpleNamespace(run_dir=tmp_path, epoch=0, step=0, steps_per_epoch=120))
    done = StepDone(1, 10, 7, 120, BATCH, 0.2873, 461, 3500, 0.41, 0.3012)
    benchmark(log.step_done, None, done)
    log.close()


@pytest.mark.benchmark(group="evaluate")
def test_evaluate_10000_in_process(benchmark, mnist_data):
    test = mnist_data[1]
    layers = network.unflatten(he_init(SIZES, 0), SIZES)

    def run():
        for a in range(0, test.count, 1000):
            chunk = range(a, min(test.count, a + 1000))
            network.predict(layers, mnist.decode_batch(test.images, chunk), [test.labels[k] for k in chunk])

    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.benchmark(group="evaluate")
def test_evaluate_10000_two_workers(benchmark, mnist_data):
    train, test, _ = mnist_data
    with Engine(SIZES, train, test, 2) as engine:
        benchmark.pedantic(engine.evaluate, args=(he_init(SIZES, 0),), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="load")
def test_load_mnist_files(benchmark, mnist_data):
    if not mnist_data[2] == "MNIST":
        pytest.skip("needs the real files (make datasets)")
    from bench.data import REAL

    benchmark.pedantic(mnist.load, args=(REAL,), rounds=3, iterations=1)


@pytest.mark.benchmark(group="load")
def test_decode_batch_of_500(benchmark, mnist_data):
    train = mnist_data[0]
    indices = batch_indices(0)

    def decode():
        X = mnist.decode_batch(train.images, indices)
        return X.rows, X.columns

    benchmark(decode)
