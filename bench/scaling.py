"""The scaling table: `python -m bench.scaling` (the last part of `make bench`).

For each worker count it starts the engine, times real training steps (batch 500: gradient across
the workers + momentum update), one evaluation of the test set and the process tree's memory, and
extrapolates seconds per epoch (60,000 images = 120 steps, plus evaluation). It then projects an
8-core machine from parts measured here: one worker's compute on a 63-example shard (what each of
8 workers gets) plus the parent's serial work at 8 workers.

    python -m bench.scaling [--workers 1,2,4,8] [--steps 24] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import random
import sys
import time

import psutil

from bench import data
from parallel_nn import mnist, network
from parallel_nn.network import he_init
from parallel_nn.optim import Optimizer
from parallel_nn.engine import SerialTimer, shard
from parallel_nn.local import LocalEngine as Engine

SIZES = [784, 32, 32, 10]
BATCH = 500


def measure(workers: int, steps: int, reduce: str = "parent") -> dict:
    # Loaded here and handed over, as the trainer does: if this process kept its own copy, forked
    # workers would share those pages and the memory column would count them.
    train, test, _ = data.load()
    count = train.count
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    rng = random.Random(0)
    engine = Engine(SIZES, train, test, workers, reduce=reduce)
    del train, test
    with engine:
        engine.set_params(params)
        for _ in range(2):  # warm-up: first touches of the shared pages
            engine.gradient(rng.sample(range(count), BATCH))
        engine.serial = SerialTimer()
        start = time.perf_counter()
        for _ in range(steps):
            grad, _, _ = engine.gradient(rng.sample(range(count), BATCH))
            with engine.serial:
                params = optimizer.step(params, grad, 0.1, 1 / BATCH)
                engine.set_params(params)
        step_seconds = (time.perf_counter() - start) / steps
        t = time.perf_counter()
        engine.evaluate()
        eval_seconds = time.perf_counter() - t
        pss = sum(psutil.Process(pid).memory_full_info().pss for pid in [os.getpid(), *engine.worker_pids()]) / 2**20
    message = pickle.dumps(("grad", shard(list(range(BATCH)), workers)[0], None))
    return {"workers": workers, "reduce": reduce, "step_s": step_seconds, "epoch_s": step_seconds * 120 + eval_seconds,
            "eval_s": eval_seconds,
            "serial_ms": 1000 * engine.serial.cpu / steps, "serial_wall_ms": 1000 * engine.serial.wall / steps, "pss_mb": pss, "message_bytes": len(message)}


def shard_compute_seconds(train, examples: int, repeats: int = 20) -> float:
    """One worker's whole step on `examples` images, in-process: read weights, decode, forward, backward."""
    params = he_init(SIZES, 0)
    rng = random.Random(1)
    best = float("inf")
    for _ in range(repeats):
        indices = rng.sample(range(train.count), examples)
        t = time.perf_counter()
        network.loss_and_gradient(network.unflatten(params, SIZES), mnist.decode_batch(train.images, indices),
                                  [train.labels[k] for k in indices])
        best = min(best, time.perf_counter() - t)
    return best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts to measure (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per worker count (default: %(default)s)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    which = data.load()[2]
    cores = psutil.cpu_count(logical=False) or 1
    machine = (f"{cpu_name()}, {cores} physical cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, data: {which}")
    rows = []
    counts = [int(w) for w in args.workers.split(",")]
    for workers, reduce in [(w, "parent") for w in counts] + [(max(counts), "workers")]:
        rows.append(measure(workers, args.steps, reduce))
        print(f"  measured {workers} worker(s), {reduce} reduces", file=sys.stderr)
    base = rows[0]["epoch_s"]
    lines = [f"machine: {machine}", "",
             "| workers | who reduces | s/step | s/epoch (120 steps + eval) | speed-up | efficiency | parent serial ms/step: CPU (wall) | tree PSS MB | step message bytes |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = base / r["epoch_s"]
        efficiency = speedup / min(r["workers"], cores)  # per core actually available
        lines.append(f"| {r['workers']} | {r['reduce']} | {r['step_s']:.3f} | {r['epoch_s']:.1f} | {speedup:.2f}x | {efficiency:.0%} | "
                     f"{r['serial_ms']:.1f} ({r['serial_wall_ms']:.1f}) | {r['pss_mb']:.0f} | {r['message_bytes']} |")
    shard63 = shard_compute_seconds(data.load()[0], 63)
    serial8 = next((r["serial_ms"] for r in rows if r["workers"] == 8 and r["reduce"] == "parent"), rows[-1]["serial_ms"]) / 1000
    eval8 = rows[0]["eval_s"] / 8
    projected = 120 * (shard63 + serial8) + eval8
    lines += ["", f"8-core projection: a 63-example shard computes in {1000 * shard63:.1f} ms, the parent's serial part at "
              f"8 workers is {1000 * serial8:.1f} ms of CPU, so a step would take ~{1000 * (shard63 + serial8):.0f} ms and an "
              f"epoch ~{projected:.1f} s (vs {rows[0]['epoch_s']:.1f} s with 1 worker here)."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
