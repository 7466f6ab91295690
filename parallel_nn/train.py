"""The training run: epochs of data-parallel SGD steps, evaluation, metrics and checkpoints.

A run directory holds config.json, metrics.jsonl (one line per epoch), weights.json (latest) and
checkpoint.json (enough to resume bit-for-bit). Ctrl-C or SIGTERM does not interrupt a step: it
sets a flag, the step in flight completes, a checkpoint is written, and the run exits with 130.
A second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from . import UserError, atomic, mnist, rundir, trace
from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from .network import Model, he_init, layer_sizes
from .optim import DEFAULT_LR, Optimizer, learning_rate
from .progress import Progress, tree_pss_mb, tree_rss_mb
from .rundir import RunLock
from .engine import SerialTimer, StopRequested, WorkerCrashed, create_engine
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
    quiet: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resolved_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


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
    files = ", ".join(rundir.run_files(run_dir))
    return (f"{run_dir} already holds a run ({files}); continue it with --resume {run_dir}, "
            "or replace it with --overwrite")


# What --resume may change: how a run is executed, never what it computes.
RUNS_ANYWHERE = ("workers", "start_method", "quiet", "reduce", "backend", "ray_address", "trace", "trace_steps")


def prepare(config: Config, resume: Optional[str]) -> tuple[Config, Model, Optional[dict]]:
    """Resolve a fresh run or a resumed one into (config, starting model, checkpoint or None)."""
    if resume:
        model, checkpoint = load_checkpoint(Path(resume) / "checkpoint.json")
        saved = Config.from_dict(checkpoint["config"])
        # What may change on resume: how it runs, not what it computes, and how many epochs in all.
        for key in RUNS_ANYWHERE:
            setattr(saved, key, getattr(config, key))
        saved.epochs = config.epochs or saved.epochs
        saved.run_dir = str(resume)
        return saved, model, checkpoint
    sizes = layer_sizes(mnist.PIXELS, config.hidden, mnist.CLASSES)
    if config.init:
        model = load_model(config.init)
        if model.sizes != sizes:
            raise UserError(f"{config.init} has layer sizes {model.sizes}, but --hidden gives {sizes}; "
                            f"pass --hidden {','.join(map(str, model.sizes[1:-1]))}")
    else:
        model = Model(sizes, he_init(sizes, config.seed))
    return config, model, None  # run_dir None: a new runs/<timestamp> is made once the backend is up


def train(config: Config, resume: Optional[str] = None, on_step: Optional[Callable[[int, int], None]] = None,
          overwrite: bool = False) -> list[dict]:
    """Run (or resume) training; returns the metrics of every epoch. `on_step(epoch, step)` is for tests.

    `overwrite`: replace a run already in config.run_dir (otherwise such a directory is refused).
    """
    config, model, checkpoint = prepare(config, resume)
    progress = Progress(config.quiet)
    if checkpoint and checkpoint["epoch"] >= config.epochs:
        print(f"{resume} has finished its {checkpoint['epoch']} epochs; nothing to do. To train it further: "
              f"--resume {resume} --epochs N, with N > {checkpoint['epoch']}", file=sys.stderr)
        return checkpoint.get("metrics", [])
    train_set, test_set = mnist.load(config.data_dir)
    train_set, test_set = train_set.limit(config.limit_train), test_set.limit(config.limit_test)
    train_count, test_labels = train_set.count, test_set.labels
    # Made before the run directory: a backend that cannot be had (Ray missing, an address that does
    # not answer) or an unwritable --trace path fails with nothing written.
    config.trace = config.trace and os.path.abspath(config.trace)  # so `plot RUN_DIR` finds it from anywhere
    tracer = trace.optional(config.trace, config.trace_steps)
    engine = create_engine(config.backend, model.sizes, train_set, test_set, config.workers,
                           start_method=config.start_method, reduce=config.reduce, address=config.ray_address,
                           warn=lambda m: (progress.clear(), print(f"warning: {m}", file=sys.stderr)))
    del train_set, test_set  # the engine holds the only copy until it moves it into shared memory
    run_dir = Path(config.run_dir) if config.run_dir else rundir.create_default()
    config.run_dir = str(run_dir)
    with RunLock(run_dir):  # held to the end of the run: a second trainer aimed here is refused
        if overwrite:
            rundir.clear(run_dir)
        elif not resume and rundir.run_files(run_dir):
            raise UserError(refusal(run_dir))
        python = interpreter()
        atomic.write_json(run_dir / "config.json", {**asdict(config), "python": python}, indent=2)

        optimizer = Optimizer(config.optimizer, len(model.params), momentum=config.momentum, weight_decay=config.weight_decay)
        epoch, step, partial, history = 0, 0, {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}, []
        if checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            epoch, step, partial, history = checkpoint["epoch"], checkpoint["step"], checkpoint["partial"], checkpoint.get("metrics", [])
            progress.say(f"resuming {run_dir} at epoch {epoch + 1}, step {step}")
        progress.say(f"python: {python} ({KIND} kernels); backend: {config.backend}")
        progress.say(f"config: {json.dumps(asdict(config))}")
        lr = config.resolved_lr()
        params = model.params
        steps_per_epoch = -(-train_count // config.batch_size)

        def save(at_epoch: int, at_step: int, sums: dict) -> None:
            # The checkpoint first: it alone is enough to resume (and to rewrite the other two), so a
            # failure after it (a full disk) loses nothing.
            now = Model(model.sizes, params)
            with tracer.span("checkpoint"):
                save_checkpoint(run_dir / "checkpoint.json", now, {
                    "config": asdict(config), "epoch": at_epoch, "step": at_step, "partial": sums,
                    "optimizer": optimizer.state_dict(), "metrics": history})
                save_model(run_dir / "weights.json", now)
                atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))

        def stop_here(at_epoch: int, at_step: int, started: float) -> Interrupted:
            partial["seconds"] = time.perf_counter() - started
            save(at_epoch, at_step, partial)
            progress.say(f"interrupted: saved {run_dir / 'checkpoint.json'} at epoch {at_epoch + 1}, step {at_step}; "
                         f"continue with --resume {run_dir}")
            return Interrupted()

        with StopFlag() as stop, engine, _written(tracer):
            engine.stop_requested = lambda: stop.requested
            engine.tracer = tracer
            engine.set_params(params)
            peak_rss = tree_rss_mb(engine.worker_pids())
            while epoch < config.epochs:
                order = epoch_order(train_count, config.seed, epoch, config.shuffle)
                started = time.perf_counter() - partial["seconds"]
                engine.serial = SerialTimer()
                steps_timed, sent, received = 0, engine.bytes_sent, engine.bytes_received
                while step < steps_per_epoch:
                    if stop.requested:
                        raise stop_here(epoch, step, started)
                    batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                    augment = None
                    if config.shift or config.rotate:  # drawn per (seed, epoch, step): the same whatever the worker count
                        augment = mnist.random_augment(len(batch), config.shift, config.rotate,
                                                       f"parallel_nn/shift/{config.seed}/{epoch}/{step}")
                    tracer.active = step < config.trace_steps
                    with tracer.span("step", epoch=epoch + 1, step=step):
                        try:
                            grad_sum, loss, correct = engine.gradient(batch, augment)
                        except StopRequested:
                            raise stop_here(epoch, step, started) from None
                        except WorkerCrashed:
                            partial["seconds"] = time.perf_counter() - started
                            save(epoch, step, partial)
                            raise
                        with engine.serial, tracer.span("update"):
                            scale = 1.0 / len(batch)  # shard sums -> the batch mean gradient
                            rate = learning_rate(lr, config.lr_schedule, epoch, step, steps_per_epoch, config.epochs)
                            params = optimizer.step(params, grad_sum, rate, scale)
                            engine.set_params(params)
                    steps_timed += 1
                    partial["loss"] += loss
                    partial["correct"] += correct
                    partial["seen"] += len(batch)
                    step += 1
                    if step % 20 == 0:
                        peak_rss = max(peak_rss, tree_rss_mb(engine.worker_pids()))
                    progress.step(epoch + 1, config.epochs, step, steps_per_epoch, partial["seen"],
                                  time.perf_counter() - started, partial["loss"] / partial["seen"])
                    if on_step:
                        on_step(epoch, step)
                seconds = time.perf_counter() - started
                sent, received = engine.bytes_sent - sent, engine.bytes_received - received  # the steps' traffic, not evaluation's
                tracer.active = True  # every evaluation is traced
                try:
                    with tracer.span("evaluate", epoch=epoch + 1):
                        test_loss, predictions = engine.evaluate()
                except StopRequested:
                    raise stop_here(epoch, step, started) from None
                correct_test = sum(p == y for p, y in zip(predictions, test_labels))
                peak_rss = max(peak_rss, tree_rss_mb(engine.worker_pids()))
                metrics = {
                    "epoch": epoch + 1,
                    "train_loss": partial["loss"] / partial["seen"],
                    "train_accuracy": partial["correct"] / partial["seen"],
                    "test_loss": test_loss / max(1, len(test_labels)),
                    "test_accuracy": correct_test / max(1, len(test_labels)),
                    "epoch_seconds": round(seconds, 3),
                    "examples_per_second": round(partial["seen"] / seconds, 1),
                    "workers": engine.workers,
                    "peak_rss_mb": round(peak_rss, 1),
                    "pss_mb": None if (p := tree_pss_mb(engine.worker_pids())) is None else round(p, 1),
                    # the parent's serial path per step (dispatch + combine + update): CPU, and wall time
                    "serial_ms_per_step": round(1000 * engine.serial.cpu / max(1, steps_timed), 3),
                    "serial_wall_ms_per_step": round(1000 * engine.serial.wall / max(1, steps_timed), 3),
                    "lr": rate,
                    "python": python,
                    "backend": config.backend,
                    "nodes": engine.nodes(),
                    "bytes_sent_per_step": round(sent / max(1, steps_timed)),
                    "bytes_received_per_step": round(received / max(1, steps_timed)),
                }
                history.append(metrics)
                epoch, step = epoch + 1, 0
                partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
                save(epoch, step, partial)
                progress.epoch(metrics, config.epochs)
        progress.say(f"saved {run_dir / 'weights.json'}, metrics in {run_dir / 'metrics.jsonl'}")
        return history


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
