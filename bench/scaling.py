"""The scaling table: `python -m bench.scaling` (the last part of `make bench`).

For each worker count it starts the engine, times real training steps (batch 500: gradient across
the workers + momentum update), one evaluation of the test set and the process tree's memory, and
extrapolates seconds per epoch (60,000 images = 120 steps, plus evaluation); `--reduce workers`
and `sharded` are measured at the largest count (or at each of --modes-at). It then projects a
machine with as many cores as each count beyond this machine's from parts measured here: one
worker's compute on its shard (63 examples for 8 workers) plus the parent's serial work measured at
that many workers. `--ray 1,2` adds rows for the Ray backend on a private local instance (its
start-up time, the bytes each actor sends and receives).

    python -m bench.scaling [--workers 1,2,4,8] [--modes-at 8] [--steps 24] [--ray 1,2] [--markdown FILE] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import psutil

from bench import data
from parallel_nn.data import mnist
from parallel_nn.kernels import interpreter
from parallel_nn.nn import network
from parallel_nn.nn.network import he_init
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.backends import create_engine
from parallel_nn.parallel.base import SerialTimer
from parallel_nn.parallel.update import make_update

SIZES = [784, 32, 32, 10]
BATCH = 500


def tree_pss_mb() -> float:
    """This process and every descendant (workers; for Ray also raylet, GCS, actors), by PSS."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def measure(workers: int, steps: int, reduce: str = "parent", backend: str = "local") -> dict:
    # Loaded here and handed over, as the trainer does: if this process kept its own copy, forked
    # workers would share those pages and the memory column would count them.
    train, test, _ = data.load()
    count = train.count
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    rng = random.Random(0)
    started = time.perf_counter()
    engine = create_engine(backend, SIZES, train, test, workers, reduce=reduce)
    del train, test
    with engine:
        ready_s = time.perf_counter() - started
        update = make_update(reduce if backend == "local" else "parent", engine, optimizer, params)
        for _ in range(10):  # warm-up: first touches of the shared pages, and the JIT's (PyPy)
            update.compute(rng.sample(range(count), BATCH), None, 0.1)
            update.commit()
        engine.serial = SerialTimer()
        sent, received = engine.bytes_sent, engine.bytes_received
        start = time.perf_counter()
        for _ in range(steps):  # the parent's update (or the sharded commit) is timed in engine.serial
            update.compute(rng.sample(range(count), BATCH), None, 0.1)
            update.commit()
        step_seconds = (time.perf_counter() - start) / steps
        sent, received = (engine.bytes_sent - sent) / steps, (engine.bytes_received - received) / steps
        t = time.perf_counter()
        engine.evaluate()
        eval_seconds = time.perf_counter() - t
        pss = tree_pss_mb()
    return {"workers": workers, "reduce": reduce if backend == "local" else "driver", "backend": backend,
            "step_s": step_seconds, "epoch_s": step_seconds * 120 + eval_seconds, "eval_s": eval_seconds,
            "ready_s": ready_s, "serial_ms": 1000 * engine.serial.cpu / steps,
            "serial_wall_ms": 1000 * engine.serial.wall / steps, "pss_mb": pss,
            "sent_per_worker": sent / workers, "received_per_worker": received / workers}


def shard_compute_seconds(train, examples: int, repeats: int = 20, sizes: list[int] = SIZES) -> float:
    """One worker's whole step on `examples` images, in-process: read weights, decode, forward, backward."""
    params = he_init(sizes, 0)
    rng = random.Random(1)
    best = float("inf")
    for _ in range(repeats):
        indices = rng.sample(range(train.count), examples)
        t = time.perf_counter()
        network.loss_and_gradient(network.unflatten(params, sizes), mnist.decode_batch(train.images, indices),
                                  [train.labels[k] for k in indices])
        best = min(best, time.perf_counter() - t)
    return best


def reduce_seconds_per_part(size: int, parts: int = 8, repeats: int = 10) -> float:
    """The driver's cost to add one more actor's gradient (float64 bytes) into the sum."""
    from array import array

    from parallel_nn.parallel.shards import reduce_sums

    blobs = [array("d", [random.random() for _ in range(size)]).tobytes() for _ in range(parts)]
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        reduce_sums(blobs)
        best = min(best, time.perf_counter() - t)
    return best / parts


def ray_projection(train, update_s: float, gbit: float = 10.0) -> list[str]:
    """Seconds per step on N nodes x C cores, built from parts measured here: one actor's compute on
    its 500/(N C) examples, the bytes through the driver's link at `gbit` Gbit/s (the weights once to
    each node, a gradient back from each actor), the driver's reduce and the update."""
    size = len(he_init(SIZES, 0))
    per_part = reduce_seconds_per_part(size)
    link = gbit * 1e9 / 8  # bytes per second
    lines = [f"Ray projection at {gbit:g} Gbit/s to the driver (from parts measured here: shard compute, the driver "
             f"adding one gradient {1000 * per_part:.2f} ms, the update {1000 * update_s:.2f} ms):", "",
             "| nodes x cores | actors | examples per actor | compute ms | transfer ms | reduce + update ms | step ms | "
             "epoch s | share of the step in the driver |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nodes, cores in [(1, 8), (2, 8), (4, 8), (8, 8), (4, 16), (8, 16), (16, 16)]:
        actors = nodes * cores
        examples = -(-BATCH // actors)
        compute = shard_compute_seconds(train, examples, repeats=8)
        transfer = (nodes * 8 * size + actors * 8 * size) / link
        driver = actors * per_part + update_s
        step = compute + transfer + driver
        lines.append(f"| {nodes} x {cores} | {actors} | {examples} | {1000 * compute:.1f} | {1000 * transfer:.1f} | "
                     f"{1000 * driver:.1f} | {1000 * step:.1f} | {120 * step:.1f} | {(transfer + driver) / step:.0%} |")
    return lines


def projections(rows: list[dict], cores_here: int) -> list[str]:
    """What machines with as many cores as each worker count measured beyond this machine's would
    do, per mode: one worker's compute on its shard (measured here, in-process) plus the parent's
    serial CPU measured at that worker count (on this machine the workers share its cores, but the
    parent's CPU time is its own work), and the epoch that makes (120 such steps and the
    evaluation split as many ways)."""
    local = [r for r in rows if r["backend"] == "local"]
    counts = sorted({r["workers"] for r in local if r["workers"] > cores_here})
    if not counts:
        return []
    lines = ["Projections from the measured parts (compute of one shard + the parent's serial CPU at that many workers):", "",
             "| cores | examples per shard | shard compute ms | who reduces | parent serial ms | step ms | epoch s | "
             "vs 1 worker here |", "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for cores in counts:
        examples = -(-BATCH // cores)
        shard = shard_compute_seconds(data.load()[0], examples)
        for r in (r for r in local if r["workers"] == cores):
            step = shard + r["serial_ms"] / 1000
            epoch = 120 * step + local[0]["eval_s"] / cores
            lines.append(f"| {cores} | {examples} | {1000 * shard:.1f} | {r['reduce']} | {r['serial_ms']:.2f} | "
                         f"{1000 * step:.1f} | {epoch:.2f} | {local[0]['epoch_s'] / epoch:.1f}x |")
    return lines


def plot_scaling(rows: list[dict], cores: int, machine: str, path: str) -> str:
    """Speed-up against workers: measured points, the ideal line, and Amdahl's law with the serial
    fraction measured here (the parent's serial CPU per step at the most workers measured, over the
    1-worker step), projected to 16 workers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no scaling chart: matplotlib is not installed (pip install -e '.[plot]')"
    local = [r for r in rows if r["backend"] == "local" and r["reduce"] == "parent"]
    base = local[0]
    most = max(local, key=lambda r: r["workers"])
    serial = most["serial_ms"] / 1000 / base["step_s"]
    n = list(range(1, 17))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(n, n, "--", color="grey", label="ideal")
    ax.plot(n, [1 / (serial + (1 - serial) / k) for k in n], "-", color="#4c78a8",
            label=f"Amdahl, serial fraction {serial:.1%} (measured)")
    for r in local:
        inside = r["workers"] <= cores
        ax.plot(r["workers"], base["epoch_s"] / r["epoch_s"], "o", color="#e45756",
                markerfacecolor="#e45756" if inside else "white",
                label=None if r is not base else "measured here (hollow: more workers than cores)")
    ax.axvline(cores, color="black", linewidth=0.8, alpha=0.5)
    ax.text(cores + 0.2, 0.4, f"{cores} cores here", fontsize=8)
    ax.set(xlabel="workers", ylabel="speed-up over 1 worker (epoch time)", xlim=(0.5, 16.5), ylim=(0, 16.5),
           title="data-parallel scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.text(0.01, 0.01, machine, fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path} (Amdahl at 16 workers: {1 / (serial + (1 - serial) / 16):.1f}x)"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    data.as_the_trainer_runs("bench.scaling")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts to measure (default: %(default)s)")
    parser.add_argument("--modes-at", default=None, metavar="8,16",
                        help="worker counts at which --reduce workers and sharded are measured too (default: the largest)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per worker count (default: %(default)s)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw the speed-up chart with the ideal line and Amdahl's law (needs matplotlib)")
    parser.add_argument("--ray", default=None, metavar="1,2",
                        help="also measure these worker counts on the Ray backend (a private local instance)")
    args = parser.parse_args()
    which = data.load()[2]
    cores = psutil.cpu_count(logical=False) or 1
    machine = (f"{cpu_name()}, {cores} physical cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {interpreter()}, data: {which}")
    rows = []
    counts = [int(w) for w in args.workers.split(",")]
    modes_at = [int(w) for w in args.modes_at.split(",")] if args.modes_at else [max(counts)]
    plan = [(w, "parent", "local") for w in counts] + [(w, r, "local") for w in modes_at for r in ("workers", "sharded")]
    plan += [(int(w), "parent", "ray") for w in args.ray.split(",")] if args.ray else []
    for workers, reduce, backend in plan:
        rows.append(measure(workers, args.steps, reduce, backend))
        print(f"  measured {workers} worker(s) on {backend}, {rows[-1]['reduce']} reduces", file=sys.stderr)
    base = rows[0]["epoch_s"]
    lines = [f"machine: {machine}", "",
             "| backend | workers | who reduces | s/step | s/epoch (120 steps + eval) | speed-up | efficiency | "
             "parent serial ms/step: CPU (wall) | tree PSS MB | KB per step per worker: sent / received | ready in s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = base / r["epoch_s"]
        efficiency = speedup / min(r["workers"], cores)  # per core actually available
        lines.append(f"| {r['backend']} | {r['workers']} | {r['reduce']} | {r['step_s']:.3f} | {r['epoch_s']:.1f} | "
                     f"{speedup:.2f}x | {efficiency:.0%} | {r['serial_ms']:.2f} ({r['serial_wall_ms']:.2f}) | "
                     f"{r['pss_mb']:.0f} | {r['sent_per_worker'] / 1000:.1f} / {r['received_per_worker'] / 1000:.1f} | "
                     f"{r['ready_s']:.1f} |")
    local2 = next((r for r in rows if r["backend"] == "local" and r["workers"] == 2), None)
    ray2 = next((r for r in rows if r["backend"] == "ray" and r["workers"] == 2), None)
    if local2 and ray2:
        lines += ["", f"Ray / local, 2 workers: {ray2['epoch_s'] / local2['epoch_s']:.2f}x the epoch time; the private Ray "
                  f"instance was ready in {ray2['ready_s']:.1f} s."]
    lines += [""] + projections(rows, cores)
    if args.ray:
        params = he_init(SIZES, 0)
        optimizer, grad = Optimizer("momentum", len(params)), [1e-3] * len(params)
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            params = optimizer.step(params, grad, 0.1, 1 / BATCH)
            best = min(best, time.perf_counter() - t)
        lines += [""] + ray_projection(data.load()[0], best)
    if args.plot:
        lines += ["", plot_scaling(rows, cores, machine, args.plot)]
    data.report(lines, args.markdown)


if __name__ == "__main__":
    main()
