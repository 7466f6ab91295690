"""Every supported interpreter on this machine, side by side: `make bench-interpreters`.

For each interpreter that tools/pythons finds (PyPy, CPython 3.10-3.13), in its own venv
(.venv-bench-<name>, built by tools/venv and reused while current), it measures:

  step      one training step in one process, batch 500 (decode, forward, backward, momentum update),
            the median of 20 after 10 warm-up steps (PyPy's JIT compiles in those)
  epoch     a whole epoch through the engine with 1 and with 2 workers: 120 steps over the first
            60,000 images in file order, then the 10,000 test images, after 5 warm-up steps
  serial    the parent's serial path per step in the 2-worker epoch (dispatch, reduce, update), CPU ms

and prints one table with ratios to CPython 3.11 measured in the same run, plus the same epoch
written with numpy (one process, the same maths) where some interpreter here has numpy.

    python -m bench.interpreters [--train N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [784, 32, 32, 10]
BATCH = 500


# ---- measuring, inside one interpreter ----

def measure(train_count: int) -> dict:
    import random

    from bench import data
    from parallel_nn.data import mnist
    from parallel_nn.nn import network
    from parallel_nn.parallel.base import SerialTimer
    from parallel_nn.kernels import KIND, interpreter
    from parallel_nn.parallel.local.pool import LocalEngine
    from parallel_nn.nn.optim import Optimizer

    train, test, which = data.load()
    params = network.he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    times = []
    for step in range(30):
        indices = random.Random(step).sample(range(train.count), BATCH)
        started = time.perf_counter()
        X = mnist.decode_batch(train.images, indices)
        grads, _, _ = network.loss_and_gradient(network.unflatten(params, SIZES), X, [train.labels[k] for k in indices])
        params = optimizer.step(params, network.flatten(grads), 0.1, 1 / BATCH)
        times.append(time.perf_counter() - started)
    result = {"python": interpreter(), "kernels": KIND, "data": which, "step_s": sorted(times[10:])[10]}
    for workers in (1, 2):
        train_set, test_set = train.limit(train_count), test
        params = network.he_init(SIZES, 0)
        optimizer = Optimizer("momentum", len(params))
        engine = LocalEngine(SIZES, train_set, test_set, workers)
        del train_set, test_set
        with engine:
            engine.set_params(params)
            for step in range(5):
                engine.gradient(range(step * BATCH, (step + 1) * BATCH))
            engine.serial = SerialTimer()
            started = time.perf_counter()
            steps = 0
            for start in range(0, train_count, BATCH):
                grad, _, _ = engine.gradient(range(start, min(train_count, start + BATCH)))
                with engine.serial:
                    params = optimizer.step(params, grad, 0.1, 1 / BATCH)
                    engine.set_params(params)
                steps += 1
            engine.evaluate()
            result[f"epoch_{workers}_s"] = time.perf_counter() - started
            result[f"serial_{workers}_ms"] = 1000 * engine.serial.cpu / steps
    return result


def numpy_epoch(train_count: int) -> dict:
    """The same network, batch and update written with numpy in one process: the yardstick."""
    import numpy as np

    from bench import data
    from parallel_nn.nn.network import he_init

    train, test, _ = data.load()
    X = np.frombuffer(train.images, dtype=np.uint8).reshape(-1, 784)[:train_count].astype(np.float64) / 255
    y = np.frombuffer(train.labels, dtype=np.uint8)[:train_count]
    flat, k, layers = he_init(SIZES, 0), 0, []
    for fan_in, fan_out in zip(SIZES, SIZES[1:]):
        W = np.array(flat[k : k + fan_in * fan_out]).reshape(fan_out, fan_in)
        k += fan_in * fan_out
        layers.append([W, np.array(flat[k : k + fan_out])])
        k += fan_out
    velocity = [[np.zeros_like(W), np.zeros_like(b)] for W, b in layers]
    started = time.perf_counter()
    for start in range(0, train_count, BATCH):
        A, acts = X[start : start + BATCH], []
        for depth, (W, b) in enumerate(layers):
            acts.append(A)
            Z = A @ W.T + b
            A = np.maximum(Z, 0) if depth < len(layers) - 1 else Z
        P = np.exp(A - A.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        P[np.arange(len(P)), y[start : start + BATCH]] -= 1
        dZ = P / len(P)
        for depth in range(len(layers) - 1, -1, -1):
            W, b = layers[depth]
            grads = (dZ.T @ acts[depth], dZ.sum(axis=0))
            if depth:
                dZ = (dZ @ W) * (acts[depth] > 0)
            for v, g, p in zip(velocity[depth], grads, layers[depth]):
                v *= 0.9
                v += g
                p -= 0.1 * v
    seconds = time.perf_counter() - started
    return {"python": f"numpy {np.__version__}", "epoch_1_s": seconds}


# ---- the driver: one venv per interpreter ----

def interpreters() -> list[tuple[str, str]]:
    out = subprocess.run([os.path.join(ROOT, "tools", "pythons")], capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("\t")) for line in out.splitlines() if line.strip()]


def venv_for(exe: str, name: str) -> str:
    venv = ".venv-bench-" + name.replace(" ", "").lower()
    subprocess.run([os.path.join(ROOT, "tools", "venv"), venv, "dev", exe], cwd=ROOT, check=True)
    return os.path.join(ROOT, venv, "bin", "python")


def run_child(python: str, mode: str, train_count: int) -> dict:
    done = subprocess.run([python, "-m", "bench.interpreters", mode, "--train", str(train_count)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], numpy_row: dict | None, train_count: int) -> str:
    base = next((r for r in rows if r["python"].startswith("CPython 3.11")), rows[0])

    def ratio(r, key):
        return f"{base[key] / r[key]:.1f}x"

    lines = [f"one process: step of {BATCH}; engine: a {train_count:,}-image epoch plus the 10,000 test images; "
             f"ratios: how many times faster than {base['python']}",
             "",
             "| interpreter | kernels | step s | ratio | epoch, 1 worker s | ratio | epoch, 2 workers s | ratio | "
             "parent serial ms/step, 2 workers |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['python']} | {r['kernels']} | {r['step_s']:.3f} | {ratio(r, 'step_s')} | {r['epoch_1_s']:.1f} | "
                     f"{ratio(r, 'epoch_1_s')} | {r['epoch_2_s']:.1f} | {ratio(r, 'epoch_2_s')} | {r['serial_2_ms']:.2f} |")
    if numpy_row:
        best = min(rows, key=lambda r: r["epoch_2_s"])
        lines += ["", f"numpy ({numpy_row['python']}, one process, the same maths): {numpy_row['epoch_1_s']:.2f} s for the "
                  f"{train_count:,} training images, without evaluation. The best here, {best['python']} with 2 workers, "
                  f"takes {best['epoch_2_s']:.1f} s with evaluation: {best['epoch_2_s'] / numpy_row['epoch_1_s']:.1f}x numpy's time."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "measure", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--train", type=int, default=60000, help="training images per epoch (default: %(default)s)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.mode == "measure":
        print(json.dumps(measure(args.train)))
        return
    if args.mode == "numpy":
        print(json.dumps(numpy_epoch(args.train)))
        return
    rows, numpy_row = [], None
    for exe, name in interpreters():
        print(f"  {name} ({exe}) ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_child(venv_for(exe, name), "measure", args.train))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"  {name}: skipped ({e})", file=sys.stderr)
        if numpy_row is None and subprocess.run([exe, "-c", "import numpy"], capture_output=True).returncode == 0:
            numpy_row = run_child(exe, "numpy", args.train)
    if not rows:
        sys.exit("no interpreter could be measured")
    text = table(rows, numpy_row, args.train)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
