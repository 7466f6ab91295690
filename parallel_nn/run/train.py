"""Starting a training run: settings, the run directory, the data and the engine (the loop is loop.py).

A run directory holds config.json, metrics.jsonl (one line per epoch), weights.json (latest),
checkpoint.json (enough to resume bit-for-bit) and progress.jsonl (one line per step, steplog.py).
Ctrl-C or SIGTERM does not interrupt a step: it sets a flag, the step in flight completes, a
checkpoint is written, and the run exits with 130. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import psutil

from parallel_nn import UserError, atomic, faults
from parallel_nn.capabilities import START_METHODS, STOP_SIGNALS
from parallel_nn.data import mnist
from parallel_nn.events import Listener, OnStep
from parallel_nn.kernels import interpreter
from parallel_nn.nn.network import Model, he_init, layer_sizes, parameter_count
from parallel_nn.nn.optim import DEFAULT_LR, SCHEDULES
from parallel_nn.parallel import trace
from parallel_nn.parallel.backends import BACKENDS, create_engine
from parallel_nn.parallel.base import Watchdog
from parallel_nn.parallel.local.pool import ALL_REDUCERS, REDUCERS
from parallel_nn.run import rundir
from parallel_nn.run.checkpoint import load_checkpoint, load_model
from parallel_nn.run.loop import Interrupted, Run, RunFiles  # noqa: F401 (Interrupted: what callers of train() catch)
from parallel_nn.run.progress import Progress
from parallel_nn.run.rundir import RunLock
from parallel_nn.run.steplog import StepLog


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
    reduce: str = "parent"  # who sums the gradients: the parent, the workers, or the workers who also update (sharded)
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
            "reduce": self.reduce in ALL_REDUCERS, "backend": self.backend in BACKENDS,
            "start_method": self.start_method in (None, "fork", "spawn", "forkserver"),
            "worker_timeout": self.worker_timeout is None or (real(self.worker_timeout) and self.worker_timeout > 0),
            "trace_steps": whole(self.trace_steps, 1),
        }
        bad = [key for key, ok in checks.items() if not ok]
        return f"{', '.join(bad)} out of range or of the wrong type" if bad else None


class StopFlag:
    """SIGINT, SIGTERM and, where they exist, SIGHUP (a closed terminal, a dropped SSH session) and
    SIGBREAK (Ctrl-Break in a Windows console) set a flag checked between steps; a second signal
    raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
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


# Memory a network needs, per parameter: the trainer ~320 bytes at its peak (the weights, gradient
# sums, optimizer state and checkpoint text, as lists of floats; measured 313 on PyPy and 368 on
# CPython 3.13 with Adam), each further worker ~100.
TRAINER_BYTES_PER_PARAMETER, WORKER_BYTES_PER_PARAMETER = 384, 128


def memory_problem(hidden: list[int], workers: int, fix: str = "choose smaller hidden layers or fewer workers") -> Optional[str]:
    """Why a network with these hidden layers would not fit in the memory available now, or None:
    said up front, not after the system has run out of memory."""
    count = parameter_count(layer_sizes(mnist.PIXELS, hidden, mnist.CLASSES))
    need = count * (TRAINER_BYTES_PER_PARAMETER + WORKER_BYTES_PER_PARAMETER * (workers - 1))
    available = psutil.virtual_memory().available
    if need <= available:
        return None
    return (f"--hidden {','.join(map(str, hidden))} makes a network of {count:,} parameters, which needs about "
            f"{need / 2**30:,.1f} GiB with {workers} worker(s); {available / 2**30:,.1f} GiB is available: "
            f"{fix}")


def prepare(config: Config, resume: Optional[str], given: Optional[set] = None) -> tuple[Config, Model, Optional[dict]]:
    """Resolve a fresh run or a resumed one into (config, starting model, checkpoint or None).

    `given`: on resume, the run-anywhere settings the user chose; the others of SAVED_ON_RESUME
    keep their saved values (None: every run-anywhere setting comes from `config`, the API's way).
    """
    if resume:
        return prepare_resume(config, resume, given)
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


def prepare_resume(config: Config, resume: str, given: Optional[set]) -> tuple[Config, Model, dict]:
    path = Path(resume) / "checkpoint.json"
    model, checkpoint = load_checkpoint(path)
    saved = Config.from_dict(checkpoint["config"])
    for key in RUNS_ANYWHERE:
        if given is None or key in given or key not in SAVED_ON_RESUME:
            setattr(saved, key, getattr(config, key))
    problem = saved.problem()  # what the saved run brings, with what was given now
    if not problem and layer_sizes(mnist.PIXELS, saved.hidden, mnist.CLASSES) != model.sizes:
        problem = f"hidden {saved.hidden} but weights of layer sizes {model.sizes}"
    if not problem and saved.workers > saved.batch_size and given is not None and "workers" not in given:
        problem = f"workers {saved.workers} is more than its batch_size {saved.batch_size}"
    if problem:
        raise UserError(f"{path}: config: {problem} (corrupt or edited checkpoint)")
    if saved.workers > saved.batch_size:
        raise UserError(f"--workers {saved.workers} is more than this run's --batch-size {saved.batch_size}: "
                        "every worker needs at least one example per step")
    refusal = unavailable(saved) or memory_problem(saved.hidden, saved.workers, "resume with fewer --workers")
    if refusal:
        raise UserError(f"{resume}: {refusal}")
    saved.epochs = config.epochs or saved.epochs
    saved.run_dir = str(resume)
    saved.data_dir = os.path.abspath(saved.data_dir)
    if saved.backend == "ray" and saved.reduce != "parent":  # one from the saved run, one given now
        raise UserError(f"--backend ray with --reduce {saved.reduce}: the workers' reductions are the local "
                        f"backend's; resume with --backend local, or with --backend ray --reduce parent")
    return saved, model, checkpoint


def unavailable(config: Config) -> Optional[str]:
    """The saved run's way of running that this system lacks (a run moved from Linux to Windows), or None."""
    if config.reduce not in REDUCERS:
        what = f"--reduce {config.reduce}"
    elif config.start_method is not None and config.start_method not in START_METHODS:
        what = f"--start-method {config.start_method}"
    else:
        return None
    return f"it ran with {what}, which this system does not offer; resume with another (see --help)"


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
        if os.path.lexists(Path(resume) / "checkpoint.json"):
            raise UserError(f"{Path(resume) / 'checkpoint.json'} is not a regular file (a FIFO, a device or a directory)")
        raise UserError(f"{resume} holds no checkpoint.json to resume from")
    made = not resume and not (run_dir and Path(run_dir).exists())
    path = Path(resume or run_dir) if (resume or run_dir) else rundir.create_default()
    rundir.refuse_links(path)  # before the lock is taken: its file could be a link too
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
          overwrite: bool = False, given: Optional[set] = None, listeners: Sequence[Listener] = ()) -> list[dict]:
    """Run (or resume) training; returns the metrics of every epoch.

    `overwrite`: replace a run already in config.run_dir (otherwise such a directory is refused).
    `given`: on resume, which run-anywhere settings the command line set (see prepare).
    `listeners` (events.Listener) follow the run, after its own files, progress line and trace;
    `on_step(epoch, step)` is called after every step (for tests).
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
        train_set, test_set, data_sha256 = run_data(config, checkpoint, resume)
        # an unwritable --trace path fails here, with nothing written
        config.trace = config.trace and os.path.abspath(config.trace)  # so `plot RUN_DIR` finds it from anywhere
        if config.trace:
            rundir.check_trace_target(config.trace, run_dir, config.data_dir, config.init)
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
            hooks = [RunFiles(), progress, tracer, StepLog(progress.warn), *listeners] + ([OnStep(on_step)] if on_step else [])
            return Run(config, model, checkpoint, engine, data, run_dir, stop, tracer, hooks, data_sha256).fit()


def run_data(config: Config, checkpoint: Optional[dict], resume: Optional[str]) -> tuple:
    """(training split, test split, SHA-256 of the whole data) for the run, checked against a resumed run's."""
    train_set, test_set = load_data(config.data_dir, resume)
    data_sha256 = fingerprint(train_set, test_set)
    if checkpoint and checkpoint.get("data_sha256") not in (None, data_sha256):
        raise UserError(f"the MNIST files in {config.data_dir} are not the ones this run was trained on; "
                        "pass --data-dir with the run's data")
    return train_set.limit(config.limit_train), test_set.limit(config.limit_test), data_sha256


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
