"""parallel_nn's data-parallel step, the whole of it in one file: the way in for a reader.

    python tutorial/minimal.py --workers 2 --epochs 1        (from the repository root)

The trainer in parallel_nn/ does what this file does, and then what a serious tool needs on top:
faults, restarts, traces, a broadcast mailbox, reductions by the workers, the trainer computing a
shard itself, checkpoints. Here there is only the step:

1. The weights live in shared memory (a RawArray): every worker reads the same floats, and
   nothing is copied to send them.
2. The parent splits the mini-batch into one contiguous shard per worker and sends each worker its
   shard's example numbers through a pipe: a few hundred bytes per step.
3. Each worker computes the *sum* of its examples' gradients with the network's own forward and
   backward passes (parallel_nn/nn/network.py) and writes it into its own slot of a second shared
   array; it answers with its summed loss and number correct.
4. The parent adds the slots in worker order (a fixed order: the same worker count gives the same
   bits every time) and applies plain SGD: w <- w - lr * (sum / batch size).

tests/test_tutorial.py holds this file's weights to the trainer's (parallel_nn.parallel.local.pool.LocalEngine)
after several steps. Read next: parallel_nn/parallel/shards.py (the shards and the reduction),
parallel_nn/parallel/local/pool.py (the pool of processes) and parallel_nn/parallel/local/worker.py
(a worker's loop); docs/design.md#layout maps the rest.
bench/textbook.py is the plain single-process reference it all started from.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from parallel_nn import UserError
from parallel_nn.data import mnist  # noqa: E402 (after the path is set)
from parallel_nn.nn.network import backward, flatten, forward, he_init, parameter_count, predict, unflatten  # noqa: E402
from parallel_nn.parallel.shards import shard  # noqa: E402

SIZES = [mnist.PIXELS, 32, 32, mnist.CLASSES]


def worker(k: int, weights, slots, images: bytes, labels: bytes, conn) -> None:
    """Worker k: for each shard it is sent, the gradient sum at the current shared weights, into slot k."""
    n = len(weights)
    while True:
        indices = conn.recv()
        if indices is None:  # the parent is done
            return
        layers = unflatten(weights[:], SIZES)  # weights[:] reads the shared floats as a list
        X = mnist.decode_batch(images, indices)
        Zs, As = forward(layers, X)
        grads, loss, correct = backward(layers, Zs, As, [labels[i] for i in indices])
        slots[k * n : (k + 1) * n] = flatten(grads)  # the shard's sum, where only worker k writes
        conn.send((loss, correct))


class Pool:
    """W worker processes around two shared arrays: the weights, and one gradient slot per worker."""

    def __init__(self, workers: int, params: list[float], images: bytes, labels: bytes):
        self.n = len(params)
        self.weights = mp.RawArray("d", params)
        self.slots = mp.RawArray("d", workers * self.n)
        self.conns, self.procs = [], []
        for k in range(workers):
            mine, theirs = mp.Pipe()
            proc = mp.Process(target=worker, args=(k, self.weights, self.slots, images, labels, theirs), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)

    def step(self, batch: list[int], lr: float) -> tuple[float, int]:
        """One data-parallel SGD step on `batch`: (summed loss, number correct)."""
        for conn, piece in zip(self.conns, shard(batch, len(self.conns))):
            conn.send(piece)  # the shard's example numbers: all a worker is sent
        replies = [conn.recv() for conn in self.conns]  # every worker has written its slot
        n = self.n
        total = self.slots[0:n]
        for k in range(1, len(self.conns)):  # the reduction, in worker order
            total = [t + g for t, g in zip(total, self.slots[k * n : (k + 1) * n])]
        scale = 1.0 / len(batch)
        self.weights[:] = [w - lr * (g * scale) for w, g in zip(self.weights[:], total)]  # the update
        return sum(loss for loss, _ in replies), sum(correct for _, correct in replies)

    def params(self) -> list[float]:
        return self.weights[:]

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join()


def accuracy(params: list[float], test_set: mnist.Split) -> float:
    """The share of test images classified right (in this process: the tutorial keeps to the step)."""
    layers, correct = unflatten(params, SIZES), 0
    for start in range(0, test_set.count, 1000):
        indices = list(range(start, min(start + 1000, test_set.count)))
        _, predictions = predict(layers, mnist.decode_batch(test_set.images, indices), [test_set.labels[i] for i in indices])
        correct += sum(p == test_set.labels[i] for p, i in zip(predictions, indices))
    return correct / test_set.count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The data-parallel step of parallel_nn, in one file (plain SGD).")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training set (default: 1)")
    p.add_argument("--batch-size", type=int, default=500, help="examples per step (default: 500)")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    p.add_argument("--data-dir", default="datasets/mnist", help="the four MNIST files (default: datasets/mnist)")
    args = p.parse_args(argv)
    if not 1 <= args.workers <= args.batch_size:
        p.error("--workers must be at least 1 and at most --batch-size")
    try:
        train_set, test_set = mnist.load(args.data_dir)
    except UserError as e:
        p.exit(1, f"error: {e}\n")
    pool = Pool(args.workers, he_init(SIZES, 0), train_set.images, train_set.labels)
    try:
        for epoch in range(1, args.epochs + 1):
            order = list(range(train_set.count))
            random.Random(epoch).shuffle(order)
            started, loss = time.perf_counter(), 0.0
            for start in range(0, len(order), args.batch_size):
                loss += pool.step(order[start : start + args.batch_size], args.lr)[0]
            print(f"epoch {epoch}: train loss {loss / train_set.count:.4f}, test accuracy "
                  f"{accuracy(pool.params(), test_set):.2%}, {time.perf_counter() - started:.1f} s of steps "
                  f"({parameter_count(SIZES):,} weights, {args.workers} workers)")
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
