"""Engine efficiency: how close the data-parallel step comes to what the cores can do.

    python -m bench.ceiling [--workers 1,2] [--steps 60] [--rounds 5] [--reduce parent] [--markdown FILE]

The ceiling for W workers: W plain processes started at once, each running the project's own
kernels on batch/W examples per step (drawing and applying the default augmentation, decode,
forward, backward, the Nesterov update of all the weights), nothing shared and nothing waited for. The engine: the
same steps through the local engine with W workers (gradient across the workers, then the
parent's update, or the workers' with --reduce sharded), as the trainer runs them: the next
step's augmentation drawn while the workers compute, and on PyPy the trainer's young generation
(for the plain processes too). Both are timed step by step in this one run, on this machine and
interpreter, after the same warm-up (the JIT's, on PyPy):

    engine efficiency = ceiling step (median) / engine step (median)

1.0 means the engine costs nothing beyond the maths. A synchronous step waits for its slowest
worker, which plain processes never do: so the table also gives, step by step, the slowest of the
W plain processes (what a barrier after every step would cost them on this machine, from the same
runs) and the engine's efficiency against that. And each step's 90th percentile (the spread:
pauses, contention), and the epoch it implies (120 steps plus one evaluation of the test set
through the engine).

Shared machines drift: the same step can take 50% longer a minute later. So each round times the
ceiling and then the engine, back to back, and gives its own efficiency; the table reports the
median of the rounds' efficiencies with their range (the spread of the figure itself, never the
best round), next to the medians of every step of every round. Each round runs every worker
count, one after the other, so the last two columns compare counts within a round: the engine's
step against the first count's (0.5 would be twice as fast with 2 workers against 1), and the
same ratio for the plain processes, which is what this machine gives two processes with nothing
shared at that moment, and so the most the engine's ratio can be asked for.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time

import psutil

from bench import data
from parallel_nn.data import mnist
from parallel_nn.kernels import interpreter
from parallel_nn.nn.network import he_init
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.local.pool import REDUCERS, LocalEngine
from parallel_nn.parallel.shards import shard_gradient
from parallel_nn.parallel.update import make_update

SIZES = [784, 32, 32, 10]
BATCH = 500
WARMUP = 20


def batches(count: int, steps: int, size: int, seed: int) -> list[tuple[list[int], str]]:
    """`steps` random batches of `size` indices, each with the seed of its augmentation, which is
    drawn inside the timed step, as the trainer draws it (one-pixel shifts, the default)."""
    rng = random.Random(seed)
    return [(rng.sample(range(count), size), f"bench/{seed}/{s}") for s in range(steps)]


def plain_process(train: mnist.Split, size: int, steps: int, seed: int, start, out) -> None:
    """One plain process's loop: its own weights, its own optimizer, its shard of every batch."""
    params = he_init(SIZES, 0)
    optimizer = Optimizer("nesterov", len(params))
    work = batches(train.count, WARMUP + steps, size, seed)
    times = []
    start.wait()  # all W copies begin together
    for indices, seed in work:
        t = time.perf_counter()
        augment = mnist.random_augment(size, 1, 0, seed)
        grad, _, _ = shard_gradient(params, SIZES, train.images, train.labels, indices, train.pixels, augment)
        params = optimizer.step(params, grad, 0.1, 1 / size)
        times.append(time.perf_counter() - t)
    out.put(times[WARMUP:])


def ceiling(train: mnist.Split, workers: int, steps: int) -> list[list[float]]:
    """Per-step seconds of `workers` plain processes at once, each on batch/workers examples: one
    list per process."""
    context = mp.get_context("fork")  # the processes share the dataset's pages, as workers do
    start, out = context.Barrier(workers), context.Queue()
    size = -(-BATCH // workers)
    procs = [context.Process(target=plain_process, args=(train, size, steps, k, start, out)) for k in range(workers)]
    for p in procs:
        p.start()
    times = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return times


def engine(train: mnist.Split, test: mnist.Split, workers: int, steps: int, reduce: str = "parent") -> tuple[list[float], float]:
    """Per-step seconds of the trainer's step through the local engine, and one evaluation's. As
    the trainer does, the parent draws the next step's augmentation while the workers compute."""
    params = he_init(SIZES, 0)
    optimizer = Optimizer("nesterov", len(params))
    work = batches(train.count, WARMUP + steps, BATCH, 99)
    times, ahead = [], None
    with LocalEngine(SIZES, train, test, workers, reduce=reduce) as eng:
        update = make_update(reduce, eng, optimizer, params)
        for i, (indices, seed) in enumerate(work):
            t = time.perf_counter()
            augment = ahead if ahead is not None else mnist.random_augment(BATCH, 1, 0, seed)
            drawn = []
            if i + 1 < len(work):
                def prefetch(following=work[i + 1][1]):
                    drawn.append(mnist.random_augment(BATCH, 1, 0, following))
            update.compute(indices, augment, 0.1, prefetch if i + 1 < len(work) else None)
            update.commit()
            ahead = drawn[0] if drawn else None
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        eng.evaluate()
        evaluation = time.perf_counter() - t
    return times[WARMUP:], evaluation


def p90(times: list[float]) -> float:
    return sorted(times)[int(0.9 * (len(times) - 1))]


def table(worker_counts: list[int], steps: int, rounds: int, reduce: str = "parent") -> list[str]:
    train, test, which = data.load()
    lines = [f"{interpreter()}, {psutil.cpu_count(logical=False)} cores, {which}, batch {BATCH}, "
             f"{steps} steps after {WARMUP} of warm-up, {rounds} rounds, --reduce {reduce}", "",
             "| workers | ceiling step (median / p90) | the slowest of the W at each step (median) | engine step (median / p90) "
             "| efficiency: median of the rounds (range) | against the slowest | p90 / median | epoch "
             f"| engine step / {worker_counts[0]}-worker step (range) | the same, plain processes (range) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    top, slowest, steps_taken, evaluations = ({w: [] for w in worker_counts} for _ in range(4))
    per_round = {w: [] for w in worker_counts}  # (ceiling median, engine median) of each round
    for _ in range(rounds):  # every count in every round, so that a slow spell of a shared machine hits all of them
        for w in worker_counts:
            per_process = ceiling(train, w, steps)
            top[w] += [t for times in per_process for t in times]
            slowest[w] += [max(step) for step in zip(*per_process)]  # what a barrier after every step would cost them
            taken, evaluation = engine(train, test, w, steps, reduce)
            steps_taken[w] += taken
            evaluations[w].append(evaluation)
            per_round[w].append((statistics.median([t for times in per_process for t in times]), statistics.median(taken)))
    first = per_round[worker_counts[0]]
    for w in worker_counts:
        c, s, e = statistics.median(top[w]), statistics.median(slowest[w]), statistics.median(steps_taken[w])
        efficiency = [ceil / eng for ceil, eng in per_round[w]]
        engine_ratio = [eng / base for (_, eng), (_, base) in zip(per_round[w], first)]
        plain_ratio = [ceil / base for (ceil, _), (base, _) in zip(per_round[w], first)]
        lines.append(f"| {w} | {1000 * c:.1f} / {1000 * p90(top[w]):.1f} ms | {1000 * s:.1f} ms "
                     f"| {1000 * e:.1f} / {1000 * p90(steps_taken[w]):.1f} ms | {data.spread(efficiency)} | {s / e:.2f} "
                     f"| {p90(steps_taken[w]) / e:.2f} | {120 * e + statistics.median(evaluations[w]):.2f} s "
                     f"| {data.spread(engine_ratio)} | {data.spread(plain_ratio)} |")
    return lines


def main() -> None:
    data.as_the_trainer_runs("bench.ceiling")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1, 2, 4, ... up to the cores here)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="ceiling and engine alternated this many times (default: %(default)s)")
    parser.add_argument("--reduce", default="parent", choices=REDUCERS, help="the engine's mode (default: %(default)s)")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table here")
    args = parser.parse_args()
    cores = psutil.cpu_count(logical=False) or 1
    doubling = [w for w in (1, 2, 4, 8, 16, 32, 64) if w < cores] + [cores]
    try:
        counts = [int(w) for w in args.workers.split(",")] if args.workers else doubling
    except ValueError:
        parser.error(f"--workers {args.workers}: comma-separated whole numbers, e.g. 1,2")
    if min(counts) < 1 or len(set(counts)) != len(counts):
        parser.error("--workers: each count at least 1, and each once")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    lines = table(counts, args.steps, args.rounds, args.reduce)
    data.report(lines, args.markdown)


if __name__ == "__main__":
    main()
