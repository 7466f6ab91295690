"""Where the trainer's step goes, untraced: `python -m bench.step_parts [--workers 2] [--epochs 2]`.

Trains with the defaults (on the real MNIST, which `make datasets` fetches, unless --data-dir says
another) in this process, with a
clock around each part of the parent's step, and prints, over the last epoch's steps, the median
and 90th percentile of each part, in ms:

    step        Run.one_step, the whole step as the trainer runs it
    dispatch    the messages to the worker processes (Exchange._send)
    own shard   the trainer's own shard: decode, forward, backward, its slot (Exchange._own)
    meanwhile   the next step's augmentation, drawn while the workers compute (Run.prefetch)
    collect     waiting for the workers' answers and reading them (Exchange._collect)
    reduce      the shard sums added (shards.reduce_sums, as pool.py calls it)
    update      the optimizer's step and the new weights written for the workers (ParentUpdate.commit)
    events      the listeners: progress line, progress.jsonl, run files (Run.tell)

With 2 workers the trainer's path is dispatch, own shard, meanwhile, collect, reduce, update and
events; the worker process computes its shard meanwhile, so collect is short when the worker is
done first. `--trace` gives every process's spans instead, but a traced step pickles them into
its answers and costs more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import psutil

from bench import data
from parallel_nn.kernels import interpreter
from parallel_nn.parallel import update
from parallel_nn.parallel.local import exchange, pool
from parallel_nn.run import loop
from parallel_nn.run.train import Config, train

PARTS = [("step", loop.Run, "one_step"), ("dispatch", exchange.Exchange, "_send"),
         ("own shard", exchange.Exchange, "_own"), ("meanwhile", loop.Run, "prefetch"),
         ("collect", exchange.Exchange, "_collect"), ("reduce", pool, "reduce_sums"),
         ("update", update.ParentUpdate, "commit"), ("events", loop.Run, "tell")]


def clocked(times: list, function):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times.append((started, time.perf_counter()))
    return timed


def measure(workers: int, epochs: int, data_dir: str) -> dict[str, list[float]]:
    """{part: its seconds in each step of the last epoch}, from one training."""
    times = {name: [] for name, _, _ in PARTS}
    originals = [(owner, attribute, getattr(owner, attribute)) for _, owner, attribute in PARTS]
    for (name, owner, attribute), (_, _, function) in zip(PARTS, originals):
        setattr(owner, attribute, clocked(times[name], function))
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            train(Config(workers=workers, epochs=epochs, run_dir=run_dir, quiet=True, data_dir=data_dir))
    finally:
        for owner, attribute, function in originals:
            setattr(owner, attribute, function)
    last = times["step"][-len(times["step"]) // epochs :]
    start, end = last[0][0], last[-1][1]
    per_step = {}
    for name, spans in times.items():  # each part's time within each step of the last epoch
        spans = [s for s in spans if start <= s[0] <= end]
        per_step[name] = [sum(b - a for a, b in spans if s0 <= a <= s1) for s0, s1 in last]
    return per_step


def main() -> None:
    data.as_the_trainer_runs("bench.step_parts")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker count (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last is measured (default 2)")
    parser.add_argument("--data-dir", default=str(data.REAL), help="the MNIST files (default: %(default)s)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.workers < 1 or args.epochs < 1:
        parser.error("--workers and --epochs must be at least 1")
    if not os.path.exists(os.path.join(args.data_dir, "t10k-labels-idx1-ubyte.gz")):
        parser.error(f"no MNIST in {args.data_dir}: run `make datasets`")
    parts = measure(args.workers, args.epochs, args.data_dir)
    lines = [f"{interpreter()}, {psutil.cpu_count(logical=False)} cores, {args.workers} workers, the {len(parts['step'])} steps of epoch {args.epochs}", "",
             "| part | median ms | p90 ms |", "|---|---:|---:|"]
    for name, seconds in parts.items():
        ordered = sorted(seconds)
        lines.append(f"| {name} | {1000 * statistics.median(ordered):.3f} | {1000 * ordered[int(0.9 * len(ordered))]:.3f} |")
    data.report(lines, args.markdown)


if __name__ == "__main__":
    main()
