"""What a run tells its listeners as it goes: the progress line, the run directory's files, the
trace, and anything else that wants to follow a run (a test's hook, a live page) subscribe here,
and the training loop (run/loop.py) knows none of them.

A listener defines the methods it needs; the others do nothing. Listeners hear an event in the
order they were given, so a listener that saves the run comes before one that says it was saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass
class StepDone:
    """One training step, finished and applied."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch, this one included
    steps: int  # steps in an epoch
    examples: int  # in this step's batch
    loss: float  # this step's mean loss
    correct: int  # this step's right answers
    seen: int  # examples this epoch so far
    seconds: float  # time this epoch so far
    running_loss: float  # mean loss over this epoch so far


class Listener:
    """Every event a run emits, as a method that does nothing. `run` is the run/loop.py Run emitting it."""

    def started(self, run) -> None:
        """Training begins (or resumes): the engine is up, the weights are in place."""

    def step_starting(self, run) -> None:
        """Step `run.step` of epoch `run.epoch` (both 0-based) is about to be computed."""

    def step_done(self, run, step: StepDone) -> None:
        """A step was applied to the weights."""

    def evaluating(self, run) -> None:
        """The epoch's steps are done; the test set is about to be evaluated."""

    def epoch_done(self, run, metrics: dict) -> None:
        """An epoch ended: `metrics` is its metrics.jsonl line; `run.epoch` already counts it."""

    def stopped(self, run) -> None:
        """A stop was requested (Ctrl-C, SIGTERM, SIGHUP): the run ends after this, exit 130."""

    def failed(self, run, error: BaseException) -> None:
        """An engine call failed (a worker error, workers that keep dying); `error` is raised next."""

    def finished(self, run) -> None:
        """Every epoch is done."""


class Listeners:
    """Several listeners heard as one, in order."""

    def __init__(self, listeners: Sequence[Listener]):
        self.listeners = list(listeners)

    def emit(self, event: str, *args, every: bool = False) -> None:
        """Call `event` on every listener. A listener that raises stops the others from hearing it,
        unless `every`: then all hear it and the first exception is raised after."""
        first: Optional[BaseException] = None
        for listener in self.listeners:
            try:
                getattr(listener, event)(*args)
            except BaseException as e:
                if not every:
                    raise
                first = first or e
        if first is not None:
            raise first


class OnStep(Listener):
    """Call `hook(epoch, step)` (0-based epoch, steps done in it) after every step: for tests."""

    def __init__(self, hook: Callable[[int, int], None]):
        self.hook = hook

    def step_done(self, run, step: StepDone) -> None:
        self.hook(step.epoch - 1, step.step)
