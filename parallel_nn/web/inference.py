"""A run's latest weights at work, for the live page: the digit drawn on the pad, the first layer's
filters as pictures, and the test digits it gets wrong.

The forward pass is the trainer's own (network.forward; shards.shard_predictions, what every
worker runs for `evaluate`), on pixels decoded as in training (level / 255), so the page agrees
with `python -m parallel_nn evaluate`. Weights are cached by their file's mtime and size, the test
set's predictions by those and the data folder.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from parallel_nn import UserError
from parallel_nn.data import mnist
from parallel_nn.files import read_limited
from parallel_nn.nn.network import Model, forward, unflatten
from parallel_nn.parallel.shards import shard_predictions
from parallel_nn.run.checkpoint import CHECKPOINT_FORMAT, model_from_json

MAX_ITEMS = 200
NO_WEIGHTS = "this run has no weights yet (they are written after its first epoch)"


def weights_path(run: Path) -> Optional[Path]:
    """The run's latest weights: weights.json, else its checkpoint."""
    for name in ("weights.json", "checkpoint.json"):
        if os.path.lexists(run / name):
            return run / name
    return None


def load_weights(path: Path) -> Model:
    """The model in a run's weights.json or checkpoint.json: a regular file inside the run, at most
    files.MAX_FILE_BYTES; UserError naming the file by its name only (no server path)."""
    try:
        obj = json.loads(read_limited(path, path.parent))
    except FileNotFoundError:
        raise UserError(NO_WEIGHTS) from None
    except OSError as e:
        raise UserError(f"{path.name}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError):
        raise UserError(f"{path.name}: not valid JSON (truncated or corrupt)") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("weights")
    return model_from_json(obj, path.name)


def softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def filters(model: Model) -> dict:
    """Each first-layer unit's input weights as 0..255, 128 = zero, scaled by the unit's own max |w|."""
    W, _ = unflatten(model.params, model.sizes)[0]
    pictures = []
    for row in W:
        scale = max(abs(w) for w in row) or 1.0
        pictures.append([min(255, max(0, 128 + round(127 * w / scale))) for w in row])
    side = math.isqrt(model.sizes[0])
    shape = [side, side] if side * side == model.sizes[0] else [1, model.sizes[0]]
    return {"shape": shape, "filters": pictures}


def predict(model: Model, pixels: list[int]) -> dict:
    """The digit and the 10 probabilities for one image of 0..255 levels (row-major)."""
    layers = unflatten(model.params, model.sizes)
    Zs, _ = forward(layers, mnist.decode_batch(bytes(pixels), [0], len(pixels)))
    z = Zs[-1][0]
    return {"digit": z.index(max(z)), "probabilities": softmax(z)}


class Cache:
    """Weights per file and test-set predictions per (weights, data folder), recomputed only when a
    file changes. Thread-safe. Files are read with no lock held, so a file slow to read holds up
    only the requests that need it (two of them may read it at once); the test set's predictions,
    a computation in progress, are waited for, not repeated."""

    KEEP = 8  # weights, and test-set predictions, of this many weights files are kept

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.lock = threading.Lock()  # the weights and the test set
        self.computing = threading.Lock()  # the test set's predictions (a second or so)
        self.models: OrderedDict = OrderedDict()  # path -> (stamp, Model), the least recently used first
        self.tests: OrderedDict = OrderedDict()  # data folder -> (stamp, Split), the least recently used first
        self.wrong: dict = {}  # (weights path, stamp, data stamp) -> (total, [(index, label, predicted)])

    @staticmethod
    def stamp(path: Path) -> tuple:
        info = os.stat(path)
        return info.st_mtime_ns, info.st_size

    @classmethod
    def stamp_or_none(cls, path: Path) -> Optional[tuple]:
        """The stamp, or None for a file that is not there (deleted since it was looked for: no 500)."""
        try:
            return cls.stamp(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def weights(self, run: Path) -> tuple[tuple, Model]:
        """(path and stamp of the file, the run's latest weights); UserError if it has none yet."""
        path = weights_path(run)
        if path is None:
            with self.lock:  # a run deleted (or emptied) takes its weights with it
                for name in ("weights.json", "checkpoint.json"):
                    self.models.pop(run / name, None)
            raise UserError(NO_WEIGHTS)
        try:
            stamp = (path, *self.stamp(path))
        except OSError:
            with self.lock:  # the entry of a deleted run goes with it
                self.models.pop(path, None)
            raise UserError(NO_WEIGHTS) from None
        return self.cached(self.models, path, stamp, lambda: load_weights(path))

    def cached(self, table: OrderedDict, key, stamp: tuple, load) -> tuple:
        """(stamp, value): table's entry for `key` if it has this stamp, else (stamp, load()) stored
        there, the least recently used beyond KEEP dropped. load() runs with no lock held."""
        with self.lock:
            entry = table.get(key)
        if entry is None or entry[0] != stamp:
            entry = (stamp, load())
        with self.lock:
            table.pop(key, None)
            table[key] = entry
            while len(table) > self.KEEP:
                table.popitem(last=False)
        return entry

    def model(self, run: Path) -> Model:
        return self.weights(run)[1]

    def test_set(self, trained_on: Optional[str] = None) -> tuple[tuple, mnist.Split]:
        """(its folder and files' stamp, the test split) from serve's data folder or, where that one
        does not hold the test set, from `trained_on` (the data directory a run's config.json
        names); UserError, naming what is missing in the first, if neither holds it."""
        folders = [Path(self.data_dir)] + ([Path(trained_on)] if trained_on else [])
        folder = next((f for f in folders if holds_test_set(f)), None)
        if folder is None:
            raise UserError(f"{folders[0]} has no t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) as regular "
                            f"files: run `make datasets`, or give serve the --data-dir that holds them")
        names = [folder / f"t10k-{kind}-ubyte{gz}" for kind in ("images-idx3", "labels-idx1") for gz in (".gz", "")]
        stamp = (str(folder), *map(self.stamp_or_none, names))
        return self.cached(self.tests, str(folder), stamp, lambda: load_test_set(folder))

    def misclassified(self, run: Path, limit: int, trained_on: Optional[str] = None) -> dict:
        """The test digits the run's latest weights get wrong, the first `limit` with their pixels
        (the test set as test_set finds it)."""
        data_stamp, test_set = self.test_set(trained_on)
        weights_stamp, model = self.weights(run)
        key = (weights_stamp, data_stamp)
        with self.computing:
            if key not in self.wrong:
                _, predictions = shard_predictions(model.params, model.sizes, test_set.images, test_set.labels, 0,
                                                   test_set.count, test_set.pixels)
                wrong = [(k, y, p) for k, (y, p) in enumerate(zip(test_set.labels, predictions)) if y != p]
                while len(self.wrong) >= self.KEEP:
                    del self.wrong[next(iter(self.wrong))]
                self.wrong[key] = (test_set.count, wrong)
            total, wrong = self.wrong[key]
        n = test_set.pixels
        items = [{"index": k, "label": y, "predicted": p, "pixels": list(test_set.images[k * n : (k + 1) * n])}
                 for k, y, p in wrong[: max(0, min(MAX_ITEMS, limit))]]
        return {"total": total, "wrong": len(wrong), "items": items}


def holds_test_set(folder: Path) -> bool:
    """Whether the files mnist.load_split would open in `folder` (for each of the test images and
    labels the .gz where it exists, else the plain file) are regular files: never a FIFO or a
    device, which a read would wait on or never finish."""
    def chosen_is_regular(stem: Path) -> bool:
        for path in (stem.with_name(stem.name + ".gz"), stem):
            try:
                return stat.S_ISREG(os.stat(path).st_mode)
            except FileNotFoundError:
                continue  # as mnist._find: the next candidate
            except (OSError, ValueError):
                return False
        return False

    return all(chosen_is_regular(folder / f"t10k-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1"))


def load_test_set(folder: Path) -> mnist.Split:
    """The test split in `folder`, read as the trainer reads it (mnist.load_split: regular files
    only, opened without waiting, so a file that became a FIFO since holds_test_set looked is
    refused, never waited on; no more read than each file's header declares)."""
    return mnist.load_split(folder, "t10k")
