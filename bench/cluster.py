"""When a cluster pays: `python -m bench.cluster` (from the Ray venv, CPython) against one PyPy box.

Ray actors run CPython (Ray has no PyPy build), while one machine runs the trainer under PyPy. For
each hidden width H (network 784-H-H-10, batch 500) this measures, on the machine it runs on:

- one box: under the box's interpreter (`--box-python`, e.g. .venv/bin/python, PyPy), a shard of
  63 examples (what each of 8 workers gets) and the parent's serial work at 8 workers (adding 8
  gradients, the Nesterov update): the projected step of one 8-core machine, as bench.scaling
  projects it;
- a cluster of N nodes x 8 cores under this interpreter (CPython): each actor's compute on its
  500/(8N) examples, the bytes through the driver's 10 Gbit/s link (the weights once to each node,
  a gradient back from each actor) and the driver's reduce and update, the model of
  bench.scaling's Ray projection; the best N is kept.

Everything is measured in one process per interpreter, parts not runs, so the table is a
projection; the ratio cluster / box says from which width on a cluster beats one box.

    python -m bench.cluster [--hidden 32,64,128,256,512] [--box-python .venv/bin/python] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from array import array

from bench import data
from bench.scaling import BATCH, shard_compute_seconds
from parallel_nn.kernels import interpreter
from parallel_nn.nn.network import he_init, layer_sizes
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.shards import reduce_sums

BOX_CORES = 8
NODES = (1, 2, 4, 8, 16)  # x BOX_CORES cores each
LINK_GBIT = 10.0


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def parts(hidden: int, train, repeats: int) -> dict:
    """The measured parts for 784-hidden-hidden-10 on this interpreter (seconds)."""
    sizes = layer_sizes(784, [hidden, hidden], 10)
    size = len(he_init(sizes, 0))
    rng = random.Random(0)
    blobs = [array("d", [rng.random() for _ in range(size)]).tobytes() for _ in range(BOX_CORES)]
    params, grad = he_init(sizes, 0), [rng.random() for _ in range(size)]
    optimizer = Optimizer("nesterov", size)
    shards = {n: shard_compute_seconds(train, -(-BATCH // (n * BOX_CORES)), repeats, sizes) for n in NODES}
    return {
        "hidden": hidden, "parameters": size, "python": interpreter(),
        "shard": shards,  # nodes -> one worker's compute on its share of the batch
        "add_one": best_of(lambda: reduce_sums(blobs), repeats) / BOX_CORES,  # adding one gradient into the sum
        "update": best_of(lambda: optimizer.step(params, grad, 0.1, 1 / BATCH), repeats),
    }


def box_step(p: dict) -> float:
    """One 8-core machine: every worker's shard in parallel, then the parent adds 8 gradients and updates."""
    return p["shard"][1] + BOX_CORES * p["add_one"] + p["update"]


def cluster_step(p: dict, nodes: int) -> float:
    actors = nodes * BOX_CORES
    transfer = (nodes + actors) * 8 * p["parameters"] / (LINK_GBIT * 1e9 / 8)
    return p["shard"][nodes] + transfer + actors * p["add_one"] + p["update"]


def measured_on(python: str, widths: list[int], repeats: int) -> list[dict]:
    """The parts under another interpreter (its own process), as this module measures them."""
    out = subprocess.run([python, "-m", "bench.cluster", "--parts", "--hidden", ",".join(map(str, widths)),
                          "--repeats", str(repeats)], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    for row in rows:
        row["shard"] = {int(k): v for k, v in row["shard"].items()}
    return rows


def table(box: list[dict], cluster: list[dict]) -> list[str]:
    lines = [f"One box: {box[0]['python']}, {BOX_CORES} cores, projected. Cluster: {cluster[0]['python']} actors on N "
             f"nodes x {BOX_CORES} cores, the best N of {', '.join(map(str, NODES))}, {LINK_GBIT:g} Gbit/s to the driver, "
             "projected. Both from parts measured on this machine; batch 500.", "",
             "| hidden | parameters | box step ms | cluster step ms (best N) | cluster / box |",
             "|---:|---:|---:|---:|---:|"]
    for b, c in zip(box, cluster):
        best = min(NODES, key=lambda n: cluster_step(c, n))
        ratio = cluster_step(c, best) / box_step(b)
        lines.append(f"| {b['hidden']} | {b['parameters']:,} | {1000 * box_step(b):.1f} | "
                     f"{1000 * cluster_step(c, best):.1f} (N={best}) | {ratio:.2f}x |")
    pays = [b["hidden"] for b, c in zip(box, cluster) if min(cluster_step(c, n) for n in NODES) < box_step(b)]
    lines += ["", f"A cluster beats one box from hidden width {pays[0]} on." if pays else
              f"At no width measured ({box[0]['hidden']} to {box[-1]['hidden']}) does the cluster beat one box."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="32,64,128,256,512", help="hidden widths (two layers each)")
    parser.add_argument("--box-python", default=None, help="the box's interpreter (default: this one)")
    parser.add_argument("--repeats", type=int, default=5, help="each part is the best of this many")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table here")
    parser.add_argument("--parts", action="store_true", help="print this interpreter's parts as JSON and stop")
    args = parser.parse_args()
    widths = [int(h) for h in args.hidden.split(",")]
    train = data.load()[0]
    parts(widths[0], train, args.repeats)  # a warm-up, discarded: PyPy's JIT compiles the kernels first
    if args.parts:
        print(json.dumps([parts(h, train, args.repeats) for h in widths]))
        return
    if sys.implementation.name == "pypy":
        print("note: Ray actors run CPython; run this from a CPython venv (e.g. .venv-ray) with --box-python "
              ".venv/bin/python", file=sys.stderr)
    cluster = [parts(h, train, args.repeats) for h in widths]
    box = measured_on(args.box_python, widths, args.repeats) if args.box_python else cluster
    lines = table(box, cluster)
    data.report(lines, args.markdown)


if __name__ == "__main__":
    main()
