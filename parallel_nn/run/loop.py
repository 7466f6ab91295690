"""One run on a started engine: the training loop, and the events it emits (events.py).

The loop is `Run.fit` → `run_epoch` → `one_step`; what happens around it (the progress line, the
run directory's files, the trace, a live page) listens to its events rather than living in it.
A step's randomness is a pure function of (seed, epoch, step), so a run resumed from any
checkpoint computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from parallel_nn import UserError, atomic, faults
from parallel_nn.data import mnist
from parallel_nn.events import Listener, Listeners, StepDone
from parallel_nn.kernels import interpreter
from parallel_nn.nn.network import Model
from parallel_nn.nn.optim import Optimizer, learning_rate
from parallel_nn.parallel.base import SerialTimer, StopRequested
from parallel_nn.parallel.update import make_update
from parallel_nn.run.checkpoint import save_checkpoint, save_model
from parallel_nn.run.progress import tree_pss_mb, tree_rss_mb


class Interrupted(Exception):
    """The run was stopped by Ctrl-C or SIGTERM after saving a checkpoint."""


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so resume needs no RNG state."""
    order = list(range(count))
    if shuffle:
        random.Random(f"parallel_nn/shuffle/{seed}/{epoch}").shuffle(order)
    return order


def fresh_sums() -> dict:
    """An epoch's running sums: training loss, correct answers, examples seen, seconds spent."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


class Run:
    """Epochs of data-parallel steps on `engine`, an evaluation after each, telling `listeners`
    (events.Listener) what happens. `data` is (training examples, test labels); `stop` has a
    `requested` flag, checked between steps."""

    def __init__(self, config, model: Model, checkpoint: Optional[dict], engine, data: tuple, run_dir: Path,
                 stop, tracer, listeners: Sequence[Listener], data_sha256: Optional[str] = None):
        self.config, self.sizes, self.engine, self.run_dir = config, model.sizes, engine, run_dir
        self.stop, self.tracer, self.events = stop, tracer, Listeners(listeners)
        self.train_count, self.test_labels = data
        self.start_params, self.data_sha256, self.python = model.params, data_sha256, interpreter()
        self.update, self.ahead = None, None  # the update's strategy, once the run starts; the next step's augmentation
        self.optimizer = Optimizer(config.optimizer, len(model.params), momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        self.epoch, self.step, self.partial, self.history = 0, 0, fresh_sums(), []
        self.resumed = checkpoint is not None
        if checkpoint:
            try:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            except ValueError as e:
                raise UserError(f"{run_dir / 'checkpoint.json'}: {e} for its optimizer {config.optimizer} "
                                "(corrupt or edited checkpoint)") from None
            self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
            self.partial, self.history = checkpoint["partial"], checkpoint.get("metrics", [])
        self.steps_per_epoch = -(-self.train_count // config.batch_size)
        if self.step > self.steps_per_epoch:
            raise UserError(f"{run_dir / 'checkpoint.json'}: step {self.step} is past the end of an epoch of "
                            f"{self.steps_per_epoch} steps (corrupt or edited checkpoint)")

    def fit(self) -> list[dict]:
        """Train to `config.epochs`; returns the metrics of every epoch."""
        self.engine.stop_requested = lambda: self.stop.requested
        self.engine.tracer = self.tracer
        self.update = make_update(self.config.reduce, self.engine, self.optimizer, self.start_params)
        self.peak_rss = tree_rss_mb(self.engine.worker_pids())
        self.tell("started")
        if self.step or self.epoch:
            faults.point("resume")
        while self.epoch < self.config.epochs:
            self.run_epoch()
            faults.point("epoch")
        self.events.emit("finished", self)
        return self.history

    def run_epoch(self) -> None:
        order = epoch_order(self.train_count, self.config.seed, self.epoch, self.config.shuffle)
        self.epoch_start = time.perf_counter() - self.partial["seconds"]
        self.engine.serial = SerialTimer()
        self.steps_timed, sent, received = 0, self.engine.bytes_sent, self.engine.bytes_received
        while self.step < self.steps_per_epoch:
            if self.stop.requested:
                raise self.stopped()
            self.one_step(order)
        traffic = (self.engine.bytes_sent - sent, self.engine.bytes_received - received)  # the steps', not evaluation's
        self.tell("evaluating")
        with self.tracer.span("evaluate", epoch=self.epoch + 1):
            test_loss, predictions = self.guarded(self.engine.evaluate)
        self.history.append(self.metrics(time.perf_counter() - self.epoch_start, test_loss, predictions, traffic))
        self.epoch, self.step, self.partial = self.epoch + 1, 0, fresh_sums()
        self.events.emit("epoch_done", self, self.history[-1])

    def one_step(self, order: list[int]) -> None:
        size = self.config.batch_size
        batch = order[self.step * size : (self.step + 1) * size]
        augment = self.augmentation(self.step, len(batch))
        self.tell("step_starting")
        with self.tracer.span("step", epoch=self.epoch + 1, step=self.step):
            loss, correct = self.guarded(lambda: self.update.compute(batch, augment, self.rate(self.step), self.prefetch))
            if not math.isfinite(loss):
                raise self.diverged()
            self.update.commit()
            faults.point("update")
        self.steps_timed += 1
        partial = self.partial
        partial["loss"] += loss
        partial["correct"] += correct
        partial["seen"] += len(batch)
        self.step += 1
        if self.step % 20 == 0:
            self.peak_rss = max(self.peak_rss, tree_rss_mb(self.engine.worker_pids()))
        self.tell("step_done", StepDone(
            self.epoch + 1, self.config.epochs, self.step, self.steps_per_epoch, len(batch), loss / len(batch), correct,
            partial["seen"], time.perf_counter() - self.epoch_start, partial["loss"] / partial["seen"]))

    @property
    def params(self) -> Sequence[float]:
        """The weights now (between steps: after the last one applied)."""
        return self.update.weights() if self.update else self.start_params

    def augmentation(self, step: int, count: int) -> Optional[bytes]:
        """Step `step`'s shifts and rotations, drawn per (seed, epoch, step): the same whatever the
        worker count. Usually drawn already, while the workers computed the step before."""
        c = self.config
        if not (c.shift or c.rotate):
            return None
        if self.ahead and self.ahead[0] == (self.epoch, step, count):
            return self.ahead[1]
        return mnist.random_augment(count, c.shift, c.rotate, f"parallel_nn/shift/{c.seed}/{self.epoch}/{step}")

    def prefetch(self) -> None:
        """While the workers compute a step, the parent draws the next step's augmentation: off the
        step's critical path."""
        step, size = self.step + 1, self.config.batch_size
        if step < self.steps_per_epoch:
            count = min(size, self.train_count - step * size)
            self.ahead = ((self.epoch, step, count), self.augmentation(step, count))

    def rate(self, step: int) -> float:
        c = self.config
        return learning_rate(c.resolved_lr(), c.lr_schedule, self.epoch, step, self.steps_per_epoch, c.epochs)

    def guarded(self, call: Callable):
        """An engine call; if it fails, the listeners hear it (the run is saved where it stands,
        before this step) before the error goes on."""
        try:
            return call()
        except StopRequested:  # the group's SIGTERM or SIGHUP reached the workers too
            raise self.stopped() from None
        except Exception as error:
            self.failed(error)
            raise

    def tell(self, event: str, *args) -> None:
        """Emit an event of a run in progress. A listener that raises fails the run as an engine
        call would: the run is saved where it stands first, so nothing is lost."""
        try:
            self.events.emit(event, self, *args)
        except Exception as error:
            self.failed(error)
            raise

    def failed(self, error: Exception) -> None:
        if hasattr(self, "epoch_start"):  # before the first epoch starts, a resumed run keeps its saved seconds
            self.partial["seconds"] = time.perf_counter() - self.epoch_start
        self.events.emit("failed", self, error, every=True)

    def stopped(self) -> Interrupted:
        self.partial["seconds"] = time.perf_counter() - self.epoch_start
        self.events.emit("stopped", self)
        return Interrupted()

    def diverged(self) -> UserError:
        return UserError(f"diverged at epoch {self.epoch + 1} step {self.step}: the loss or the weights are no longer "
                         f"finite numbers; lower --lr (the last checkpoint in {self.run_dir}, if any, is kept)")

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


class RunFiles(Listener):
    """The run directory's checkpoint.json, weights.json and metrics.jsonl: written after every
    epoch, and when the run stops or an engine call fails (where it stands, before that step).

    The checkpoint first: it alone is enough to resume (and to rewrite the other two), so a failure
    after it (a full disk) loses nothing. Weights that are not finite are never saved.
    """

    def epoch_done(self, run: Run, metrics: dict) -> None:
        self.save(run)

    def stopped(self, run: Run) -> None:
        self.save(run)

    def failed(self, run: Run, error: BaseException) -> None:
        self.save(run)

    def save(self, run: Run) -> None:
        params = list(run.params)
        if not all(map(math.isfinite, params)):
            raise run.diverged()
        now = Model(run.sizes, params)
        with run.tracer.span("checkpoint"):
            save_checkpoint(run.run_dir / "checkpoint.json", now, {
                "config": asdict(run.config), "epoch": run.epoch, "step": run.step, "partial": run.partial,
                "optimizer": run.update.state_dict(), "metrics": run.history, "data_sha256": run.data_sha256})
            save_model(run.run_dir / "weights.json", now)
            atomic.write_text(run.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.history))
