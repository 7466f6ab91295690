"""The accuracy study's variants that did not become flags, so their rows can be rerun:

    python -m bench.study VARIANT [VARIANT ...] -- [trainer flags]
    python -m bench.study smooth=0.1 -- --epochs 20 --lr-schedule onecycle --lr 0.4

Each variant patches the trainer in this process before its workers start, and `--start-method
fork` is added so the workers inherit the patch. None of them helped (README, "The study"), so
they are kept here as measured alternatives rather than as options of the trainer:

  smooth=EPS     label smoothing: train towards (1 - EPS) * one-hot + EPS / 10 (losses are still
                 reported as plain cross-entropy, so they compare with other runs)
  rotate=DEG     after the shift, rotate each training image by a whole number of degrees in
                 [-DEG, DEG] about its centre (nearest pixel), drawn from the image's index and
                 its shift, so it is the same for any worker count
  clean=K        no shift in the last K epochs: finish on the images as stored
  init-gain=G    W ~ N(0, G / fan_in) (He's initialisation is G = 2; LeCun's is G = 1)
"""

from __future__ import annotations

import math
import random
import sys
from operator import itemgetter

from parallel_nn import cli, engine, kernels, mnist, network
from parallel_nn.tensor import SparseMatrix

SIDE = 28


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


def rotation(degrees: int):
    """A gather that rotates a 28x28 byte image (plus one zero byte at the end, for outside)."""
    t = math.radians(degrees)
    cos, sin, centre = math.cos(t), math.sin(t), (SIDE - 1) / 2
    sources = []
    for r in range(SIDE):
        for c in range(SIDE):
            x, y = c - centre, r - centre
            sx, sy = round(cos * x + sin * y + centre), round(-sin * x + cos * y + centre)
            sources.append(sy * SIDE + sx if 0 <= sx < SIDE and 0 <= sy < SIDE else SIDE * SIDE)
    return itemgetter(*sources)


def rotate(most: int) -> None:
    decode, gathers = engine.decode_batch, {}

    def rotated(images, indices, pixels=mnist.PIXELS, shifts=None):
        X = decode(images, indices, pixels, shifts)
        if shifts is None:  # the test set, or a step without augmentation
            return X
        out = []
        for n, k in enumerate(indices):
            image = X.raw[n * pixels : (n + 1) * pixels]
            angle = random.Random(f"rotate/{k}/{shifts[2 * n]}/{shifts[2 * n + 1]}").randint(-most, most)
            if angle and angle not in gathers:
                gathers[angle] = rotation(angle)
            out.append(bytes(gathers[angle](image + b"\0")) if angle else image)
        return SparseMatrix(b"".join(out), pixels, kernels.sparse_rows)

    engine.decode_batch = rotated


def clean(last: int, argv: list[str]) -> None:
    epochs = cli.train_parser().parse_args(argv).epochs
    draw = mnist.random_shifts

    def shifts(count, most, seed):
        epoch = int(seed.split("/")[-2])  # the trainer's seed string ends in /{epoch}/{step}
        return None if epoch >= epochs - last else draw(count, most, seed)

    mnist.random_shifts = shifts


def init_gain(gain: float) -> None:
    import parallel_nn.train as trainer  # the trainer calls he_init by the name it imported

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
        elif name == "rotate":
            rotate(int(value))
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
