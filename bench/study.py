"""The accuracy study's variants that did not become flags, so their rows can be rerun:

    python -m bench.study VARIANT [VARIANT ...] -- [trainer flags]
    python -m bench.study smooth=0.1 -- --epochs 20 --lr-schedule onecycle --lr 0.4

Each variant patches the trainer in this process before its workers start, and `--start-method
fork` is added so the workers inherit the patch. None of them helped (docs/accuracy.md, "The study"), so
they are kept here as measured alternatives rather than as options of the trainer (rotation,
which did help, is the trainer's `--rotate`):

  smooth=EPS     label smoothing: train towards (1 - EPS) * one-hot + EPS / 10 (losses are still
                 reported as plain cross-entropy, so they compare with other runs)
  clean=K        no shift in the last K epochs: finish on the images as stored
  init-gain=G    W ~ N(0, G / fan_in) (He's initialisation is G = 2; LeCun's is G = 1)
"""

from __future__ import annotations

import math
import sys

from parallel_nn import cli
from parallel_nn.data import mnist
from parallel_nn.nn import network


def smooth(epsilon: float) -> None:
    plain = network.softmax_cross_entropy

    def smoothed(Z, labels):
        dZ, loss, predictions = plain(Z, labels)  # dZ = p - onehot
        share = epsilon / len(Z[0]) if Z else 0.0
        for d, y in zip(dZ, labels):
            for k in range(len(d)):
                d[k] -= share
            d[y] += epsilon  # p - ((1 - eps) onehot + eps / K)
        return dZ, loss, predictions

    network.softmax_cross_entropy = smoothed


def clean(last: int, argv: list[str]) -> None:
    epochs = cli.train_parser().parse_args(argv).epochs
    draw = mnist.random_augment

    def augment(count, shift, rotate, seed):
        epoch = int(seed.split("/")[-2])  # the trainer's seed string ends in /{epoch}/{step}
        return None if epoch >= epochs - last else draw(count, shift, rotate, seed)

    mnist.random_augment = augment


def init_gain(gain: float) -> None:
    import parallel_nn.run.train as trainer  # the trainer calls he_init by the name it imported

    def init(sizes, seed):
        factor = math.sqrt(gain / 2.0)  # He's draws, rescaled: only the gain differs
        return [p * factor for p in network.he_init(sizes, seed)]

    trainer.he_init = init


def main(argv: list[str]) -> int:
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    variants, trainer = argv[:split], argv[split + 1 :]
    for variant in variants:
        name, _, value = variant.partition("=")
        if name == "smooth":
            smooth(float(value))
        elif name == "clean":
            clean(int(value), trainer)
        elif name == "init-gain":
            init_gain(float(value))
        else:
            sys.exit(f"unknown variant {variant!r}\n\n{__doc__}")
    print(f"study variants: {' '.join(variants) or 'none'}", flush=True)
    return cli.main([*trainer, "--start-method", "fork"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
