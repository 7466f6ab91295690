"""The training run: epochs of data-parallel SGD steps, evaluation, metrics and checkpoints.

A run directory holds config.json, metrics.jsonl (one line per epoch), weights.json (latest) and
checkpoint.json (enough to resume bit-for-bit). Ctrl-C or SIGTERM does not interrupt a step: it
sets a flag, the step in flight completes, a checkpoint is written, and the run exits with 130.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from . import UserError, atomic, faults, mnist, rundir, trace
from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from .network import Model, he_init, layer_sizes
from .optim import DEFAULT_LR, SCHEDULES, Optimizer, learning_rate
from .progress import Progress, tree_pss_mb, tree_rss_mb
from .rundir import RunLock
from .engine import SerialTimer, StopRequested, Watchdog, create_engine
from .kernels import KIND, interpreter


@dataclass
class Config:
    """Every setting of a run, resolved; saved as config.json and inside each checkpoint."""

    workers: int = 1
    epochs: int = 10
    batch_size: int = 500
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    optimizer: str = "nesterov"
    lr: Optional[float] = None  # None: DEFAULT_LR[optimizer]
    lr_schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 0.0
    shift: int = 1  # augmentation: translate each training image by up to this many pixels (0: off)
    rotate: int = 0  # augmentation: and rotate it by up to this many degrees (0: off)
    seed: int = 0
    data_dir: str = "datasets/mnist"
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    shuffle: bool = True
    run_dir: Optional[str] = None  # None: runs/<timestamp>
    init: Optional[str] = None
    start_method: Optional[str] = None  # None: the platform's default
    reduce: str = "parent"  # who sums the workers' gradients: the parent, or the workers themselves
    backend: str = "local"  # where the workers run: local processes, or Ray actors
    ray_address: Optional[str] = None  # the Ray cluster to join (None: RAY_ADDRESS, else a private instance)
    trace: Optional[str] = None  # write a Chrome trace-event timeline here
    trace_steps: int = 30  # steps traced at the start of each epoch (and every evaluation)
    worker_timeout: Optional[float] = None  # seconds a worker may take to answer (None: scaled from measured steps)
    quiet: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def problem(self) -> Optional[str]:
        """What makes these settings impossible (a hand-edited checkpoint), or None."""
        def whole(v, low=0):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def real(v, low=0.0, high=math.inf):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v < high

        checks = {
            "workers": whole(self.workers, 1), "epochs": whole(self.epochs, 1), "batch_size": whole(self.batch_size, 1),
            "hidden": isinstance(self.hidden, list) and bool(self.hidden) and all(whole(h, 1) for h in self.hidden),
            "optimizer": self.optimizer in DEFAULT_LR, "lr": self.lr is None or (real(self.lr) and self.lr > 0),
            "lr_schedule": self.lr_schedule in SCHEDULES, "momentum": real(self.momentum, 0.0, 1.0),
            "weight_decay": real(self.weight_decay), "shift": whole(self.shift) and self.shift <= 4,
            "rotate": whole(self.rotate) and self.rotate <= 30, "seed": whole(self.seed, -2**63),
            "data_dir": isinstance(self.data_dir, str),
            "limit_train": self.limit_train is None or whole(self.limit_train, 1),
            "limit_test": self.limit_test is None or whole(self.limit_test, 1),
        }
        bad = [key for key, ok in checks.items() if not ok]
        return f"{', '.join(bad)} out of range or of the wrong type" if bad else None


class Interrupted(Exception):
    """The run was stopped by Ctrl-C or SIGTERM after saving a checkpoint."""


class StopFlag:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal, a dropped SSH session) set a flag checked
    between steps; a second signal raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _written:
    """Write the trace when the run ends, however it ends (Ctrl-C included): always valid JSON."""

    def __init__(self, tracer):
        self.tracer = tracer

    def __enter__(self):
        return self.tracer

    def __exit__(self, *exc):
        if isinstance(self.tracer, trace.Tracer):
            self.tracer.write()


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so resume needs no RNG state."""
    order = list(range(count))
    if shuffle:
        random.Random(f"parallel_nn/shuffle/{seed}/{epoch}").shuffle(order)
    return order


def refusal(run_dir) -> str:
    """The one line for a new run aimed at a directory that holds one."""
    files = rundir.run_files(run_dir)
    if "checkpoint.json" in files:
        how = f"continue it with --resume {run_dir}, or replace it with --overwrite"
    else:
        how = "it has no checkpoint to resume from; replace it with --overwrite"
    return f"{run_dir} already holds a run ({', '.join(files)}); {how}"


# What --resume may change: how a run is executed, never what it computes. Where the data lives
# is not what is computed either: the data itself is checked against the run's fingerprint.
RUNS_ANYWHERE = ("workers", "start_method", "quiet", "reduce", "backend", "ray_address", "trace", "trace_steps",
                 "worker_timeout", "data_dir")
# Of those, what a resumed run keeps from the saved run unless told otherwise: the workers (a
# different count adds in a different order, ~1e-16 away) and the way they run.
SAVED_ON_RESUME = ("workers", "start_method", "reduce", "backend", "ray_address", "worker_timeout", "data_dir")


def prepare(config: Config, resume: Optional[str], given: Optional[set] = None) -> tuple[Config, Model, Optional[dict]]:
    """Resolve a fresh run or a resumed one into (config, starting model, checkpoint or None).

    `given`: on resume, the run-anywhere settings the user chose; the others of SAVED_ON_RESUME
    keep their saved values (None: every run-anywhere setting comes from `config`, the API's way).
    """
    if resume:
        model, checkpoint = load_checkpoint(Path(resume) / "checkpoint.json")
        saved = Config.from_dict(checkpoint["config"])
        problem = saved.problem()
        if problem:
            raise UserError(f"{Path(resume) / 'checkpoint.json'}: config: {problem} (corrupt or edited checkpoint)")
        for key in RUNS_ANYWHERE:
            if given is None or key in given or key not in SAVED_ON_RESUME:
                setattr(saved, key, getattr(config, key))
        saved.epochs = config.epochs or saved.epochs
        saved.run_dir = str(resume)
        saved.data_dir = os.path.abspath(saved.data_dir)
        return saved, model, checkpoint
    config.data_dir = os.path.abspath(config.data_dir)  # so --resume works from any directory
    sizes = layer_sizes(mnist.PIXELS, config.hidden, mnist.CLASSES)
    if config.init:
        model = load_model(config.init)
        if model.sizes != sizes:
            raise UserError(f"{config.init} has layer sizes {model.sizes}, but --hidden gives {sizes}; "
                            f"pass --hidden {','.join(map(str, model.sizes[1:-1]))}")
    else:
        model = Model(sizes, he_init(sizes, config.seed))
    return config, model, None


def load_data(data_dir: str, resume: Optional[str]) -> tuple[mnist.Split, mnist.Split]:
    try:
        return mnist.load(data_dir)
    except UserError as e:
        if resume and not os.path.isdir(data_dir):
            raise UserError(f"{e} (this run's data was in {data_dir}; if it moved, pass --resume {resume} "
                            "--data-dir WHERE_IT_IS_NOW)") from None
        raise


def fingerprint(train_set: mnist.Split, test_set: mnist.Split) -> str:
    """SHA-256 of the data a run computes on, so a resume from another --data-dir is checked."""
    digest = hashlib.sha256()
    for blob in (train_set.images, train_set.labels, test_set.images, test_set.labels):
        digest.update(blob)
    return digest.hexdigest()


@contextlib.contextmanager
def claimed(run_dir: Optional[str], resume: Optional[str], overwrite: bool):
    """The run directory, locked for this trainer, before anything in it is read or written.

    A start that fails before the run's first file is written (missing data, no backend) leaves
    nothing behind: the lock file goes, and so does a directory made for this run.
    """
    if resume and not (Path(resume) / "checkpoint.json").is_file():
        raise UserError(f"{resume} holds no checkpoint.json to resume from")
    made = not resume and not (run_dir and Path(run_dir).exists())
    path = Path(resume or run_dir) if (resume or run_dir) else rundir.create_default()
    lock = RunLock(path)
    had_lock_file = lock.path.exists()
    with lock:
        before = rundir.run_files(path)
        try:
            if before and not resume and not overwrite:  # --overwrite clears it once the engine is up
                raise UserError(refusal(path))
            rundir.remove_leftovers(path)  # temporary files of a trainer that was killed mid-write
            yield path
        except BaseException:
            if rundir.run_files(path) == before and not resume and not had_lock_file:
                lock.discard(remove_directory=made)
            raise


def train(config: Config, resume: Optional[str] = None, on_step: Optional[Callable[[int, int], None]] = None,
          overwrite: bool = False, given: Optional[set] = None) -> list[dict]:
    """Run (or resume) training; returns the metrics of every epoch. `on_step(epoch, step)` is for tests.

    `overwrite`: replace a run already in config.run_dir (otherwise such a directory is refused).
    `given`: on resume, which run-anywhere settings the command line set (see prepare).
    """
    # the stop flag first: a signal while the data loads or the engine starts still ends in a checkpoint
    with StopFlag() as stop, claimed(config.run_dir, resume, overwrite) as run_dir:
        faults.point("start")
        config, model, checkpoint = prepare(config, resume, given)  # read under the lock: never a stale one
        config.run_dir = str(run_dir)
        progress = Progress(config.quiet)
        if checkpoint and checkpoint["epoch"] >= config.epochs:
            progress.note(f"{resume} has finished its {checkpoint['epoch']} epochs; nothing to do. To train it further: "
                          f"--resume {resume} --epochs N, with N > {checkpoint['epoch']}")
            return checkpoint.get("metrics", [])
        train_set, test_set = load_data(config.data_dir, resume)
        data_sha256 = fingerprint(train_set, test_set)
        if checkpoint and checkpoint.get("data_sha256") not in (None, data_sha256):
            raise UserError(f"the MNIST files in {config.data_dir} are not the ones this run was trained on; "
                            "pass --data-dir with the run's data")
        train_set, test_set = train_set.limit(config.limit_train), test_set.limit(config.limit_test)
        # an unwritable --trace path fails here, with nothing written
        config.trace = config.trace and os.path.abspath(config.trace)  # so `plot RUN_DIR` finds it from anywhere
        tracer = trace.optional(config.trace, config.trace_steps)
        engine = create_engine(config.backend, model.sizes, train_set, test_set, config.workers,
                               start_method=config.start_method, reduce=config.reduce, address=config.ray_address,
                               warn=progress.warn)
        engine.watchdog = Watchdog(config.worker_timeout)
        data = (train_set.count, test_set.labels)
        del train_set, test_set  # the engine holds the only copy until it moves it into shared memory
        with engine, _written(tracer):
            # written once the engine is up: a start that fails leaves the directory as it was
            if overwrite:
                rundir.clear(run_dir)
            atomic.write_json(run_dir / "config.json", {**asdict(config), "python": interpreter()}, indent=2)
            run = Run(config, model, checkpoint, engine, data, run_dir, tracer, progress, stop, on_step)
            run.data_sha256 = data_sha256
            return run.fit()


class Run:
    """One run on a started engine: epochs of data-parallel steps, an evaluation after each, and a
    checkpoint after each evaluation and whenever the run stops (a signal, a failed engine)."""

    def __init__(self, config: Config, model: Model, checkpoint: Optional[dict], engine, data: tuple, run_dir: Path,
                 tracer, progress: Progress, stop: StopFlag, on_step: Optional[Callable[[int, int], None]]):
        self.config, self.sizes, self.engine, self.run_dir = config, model.sizes, engine, run_dir
        self.tracer, self.progress, self.stop, self.on_step = tracer, progress, stop, on_step
        self.train_count, self.test_labels = data
        self.params = model.params
        self.optimizer = Optimizer(config.optimizer, len(model.params), momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        self.epoch, self.step, self.partial, self.history = 0, 0, fresh_sums(), []
        if checkpoint:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
            self.partial, self.history = checkpoint["partial"], checkpoint.get("metrics", [])
            progress.say(f"resuming {run_dir} at epoch {self.epoch + 1}, step {self.step}")
        self.steps_per_epoch = -(-self.train_count // config.batch_size)
        if self.step > self.steps_per_epoch:
            raise UserError(f"{run_dir / 'checkpoint.json'}: step {self.step} is past the end of an epoch of "
                            f"{self.steps_per_epoch} steps (corrupt or edited checkpoint)")
        self.python = interpreter()
        self.data_sha256: Optional[str] = None
        progress.say(f"python: {self.python} ({KIND} kernels); backend: {config.backend}")
        progress.say(f"config: {json.dumps(asdict(config))}")

    def fit(self) -> list[dict]:
        self.engine.stop_requested = lambda: self.stop.requested
        self.engine.tracer = self.tracer
        self.engine.set_params(self.params)
        self.peak_rss = tree_rss_mb(self.engine.worker_pids())
        if self.step or self.epoch:
            faults.point("resume")
        while self.epoch < self.config.epochs:
            self.run_epoch()
            faults.point("epoch")
        self.progress.say(f"saved {self.run_dir / 'weights.json'}, metrics in {self.run_dir / 'metrics.jsonl'}")
        return self.history

    def run_epoch(self) -> None:
        order = epoch_order(self.train_count, self.config.seed, self.epoch, self.config.shuffle)
        self.started = time.perf_counter() - self.partial["seconds"]
        self.engine.serial = SerialTimer()
        self.steps_timed, sent, received = 0, self.engine.bytes_sent, self.engine.bytes_received
        while self.step < self.steps_per_epoch:
            if self.stop.requested:
                raise self.stopped()
            self.one_step(order)
        # the steps' traffic, not evaluation's
        traffic = (self.engine.bytes_sent - sent, self.engine.bytes_received - received)
        self.tracer.active = True  # every evaluation is traced
        with self.tracer.span("evaluate", epoch=self.epoch + 1):
            test_loss, predictions = self.guarded(self.engine.evaluate)
        self.history.append(self.metrics(time.perf_counter() - self.started, test_loss, predictions, traffic))
        self.epoch, self.step, self.partial = self.epoch + 1, 0, fresh_sums()
        self.save()
        self.progress.epoch(self.history[-1], self.config.epochs)

    def one_step(self, order: list[int]) -> None:
        config, step = self.config, self.step
        batch = order[step * config.batch_size : (step + 1) * config.batch_size]
        augment = None
        if config.shift or config.rotate:  # drawn per (seed, epoch, step): the same whatever the worker count
            augment = mnist.random_augment(len(batch), config.shift, config.rotate,
                                           f"parallel_nn/shift/{config.seed}/{self.epoch}/{step}")
        self.tracer.active = step < config.trace_steps
        with self.tracer.span("step", epoch=self.epoch + 1, step=step):
            grad_sum, loss, correct = self.guarded(lambda: self.engine.gradient(batch, augment))
            if not math.isfinite(loss):
                raise self.diverged()
            with self.engine.serial, self.tracer.span("update"):
                scale = 1.0 / len(batch)  # shard sums -> the batch mean gradient
                self.params = self.optimizer.step(self.params, grad_sum, self.rate(step), scale)
                self.engine.set_params(self.params)
            faults.point("update")
        self.steps_timed += 1
        self.partial["loss"] += loss
        self.partial["correct"] += correct
        self.partial["seen"] += len(batch)
        self.step += 1
        if self.step % 20 == 0:
            self.peak_rss = max(self.peak_rss, tree_rss_mb(self.engine.worker_pids()))
        self.progress.step(self.epoch + 1, config.epochs, self.step, self.steps_per_epoch, self.partial["seen"],
                           time.perf_counter() - self.started, self.partial["loss"] / self.partial["seen"])
        if self.on_step:
            self.on_step(self.epoch, self.step)

    def rate(self, step: int) -> float:
        c = self.config
        return learning_rate(c.resolved_lr(), c.lr_schedule, self.epoch, step, self.steps_per_epoch, c.epochs)

    def guarded(self, call: Callable):
        """An engine call; if it fails, the run is saved where it stands (before this step) first."""
        try:
            return call()
        except StopRequested:  # the group's SIGTERM or SIGHUP reached the workers too
            raise self.stopped() from None
        except Exception:
            self.progress.clear()
            self.save_partial()
            raise

    def metrics(self, seconds: float, test_loss: float, predictions: list[int], traffic: tuple[int, int]) -> dict:
        partial, engine, steps = self.partial, self.engine, max(1, self.steps_timed)
        tested = max(1, len(self.test_labels))
        self.peak_rss = max(self.peak_rss, tree_rss_mb(engine.worker_pids()))
        pss = tree_pss_mb(engine.worker_pids())
        return {
            "epoch": self.epoch + 1,
            "train_loss": partial["loss"] / partial["seen"],
            "train_accuracy": partial["correct"] / partial["seen"],
            "test_loss": test_loss / tested,
            "test_accuracy": sum(p == y for p, y in zip(predictions, self.test_labels)) / tested,
            "epoch_seconds": round(seconds, 3),
            "examples_per_second": round(partial["seen"] / seconds, 1),
            "workers": engine.workers,
            "peak_rss_mb": round(self.peak_rss, 1),
            "pss_mb": None if pss is None else round(pss, 1),
            # the parent's serial path per step (dispatch + combine + update): CPU, and wall time
            "serial_ms_per_step": round(1000 * engine.serial.cpu / steps, 3),
            "serial_wall_ms_per_step": round(1000 * engine.serial.wall / steps, 3),
            "lr": self.rate(self.steps_per_epoch - 1),  # the epoch's last step's (a resumed evaluation has no step)
            "python": self.python,
            "backend": self.config.backend,
            "nodes": engine.nodes(),
            "bytes_sent_per_step": round(traffic[0] / steps),
            "bytes_received_per_step": round(traffic[1] / steps),
        }

    def save(self) -> None:
        """The checkpoint first: it alone is enough to resume (and to rewrite the other two), so a
        failure after it (a full disk) loses nothing. Weights that are not finite are never saved."""
        if not all(map(math.isfinite, self.params)):
            raise self.diverged()
        now = Model(self.sizes, self.params)
        with self.tracer.span("checkpoint"):
            save_checkpoint(self.run_dir / "checkpoint.json", now, {
                "config": asdict(self.config), "epoch": self.epoch, "step": self.step, "partial": self.partial,
                "optimizer": self.optimizer.state_dict(), "metrics": self.history, "data_sha256": self.data_sha256})
            save_model(self.run_dir / "weights.json", now)
            atomic.write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history))

    def save_partial(self) -> None:
        self.partial["seconds"] = time.perf_counter() - self.started
        self.save()

    def stopped(self) -> Interrupted:
        self.save_partial()
        self.progress.say(f"interrupted: saved {self.run_dir / 'checkpoint.json'} at epoch {self.epoch + 1}, "
                          f"step {self.step}; continue with --resume {self.run_dir}")
        return Interrupted()

    def diverged(self) -> UserError:
        return UserError(f"diverged at epoch {self.epoch + 1} step {self.step}: the loss or the weights are no longer "
                         f"finite numbers; lower --lr (the last checkpoint in {self.run_dir}, if any, is kept)")


def fresh_sums() -> dict:
    """An epoch's running sums: training loss, correct answers, examples seen, seconds spent."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def evaluate(weights: str, data_dir: str, workers: int, start_method: Optional[str] = None,
             limit_test: Optional[int] = None) -> dict[str, Any]:
    """Test loss, accuracy, confusion matrix (rows: true digit, columns: predicted) and predictions."""
    model = load_model(weights)
    test_set = mnist.load_split(data_dir, "t10k").limit(limit_test)
    empty = mnist.Split(b"", b"", test_set.rows, test_set.cols)
    labels = test_set.labels
    engine = create_engine("local", model.sizes, empty, test_set, workers, start_method=start_method)
    del test_set
    with engine:
        loss, predictions = engine.evaluate(model.params)
    confusion = [[0] * mnist.CLASSES for _ in range(mnist.CLASSES)]
    for y, p in zip(labels, predictions):
        confusion[y][p] += 1
    count = max(1, len(labels))
    return {"test_loss": loss / count, "test_accuracy": sum(confusion[d][d] for d in range(mnist.CLASSES)) / count,
            "confusion": confusion, "predictions": predictions}
