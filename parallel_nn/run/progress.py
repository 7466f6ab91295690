"""What a run shows while it runs: a live progress line, the per-epoch line, and the memory of its
process tree (the numbers metrics.jsonl records)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Optional

import psutil

from parallel_nn.events import Listener, StepDone
from parallel_nn.kernels import KIND, slow_path_note


def write(stream, text: str) -> bool:
    """Write and flush `text`; an output that has gone away (a closed terminal: EIO; a closed pipe:
    EPIPE) never ends a run. Its descriptor is pointed at /dev/null so that later writes, and
    Python's own flush at exit, succeed quietly. Returns whether the text was written."""
    if stream is None:  # started with that descriptor closed (`>&-`): Python has no stream for it
        return False
    try:
        stream.write(text)
        stream.flush()
        return True
    except (OSError, ValueError):  # ValueError: the stream was closed
        silence(stream)
        return False


def silence(stream) -> None:
    """Point the stream's descriptor at /dev/null: an output that has gone away takes writes quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def ansi_terminal() -> bool:
    """Whether the terminal understands ANSI escapes (`\033[K`: erase the line): POSIX terminals
    do, unless TERM says `dumb`; a Windows console does from Windows 10 on, once asked to (a
    legacy console would print them as garbage)."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # Windows only: AttributeError elsewhere
    except (ImportError, AttributeError):
        return True
    try:
        handle = kernel32.GetStdHandle(-12)  # STD_ERROR_HANDLE
        mode = ctypes.c_uint32()
        return bool(kernel32.GetConsoleMode(handle, ctypes.byref(mode))
                    and kernel32.SetConsoleMode(handle, mode.value | 0x0004))  # ENABLE_VIRTUAL_TERMINAL_PROCESSING
    except (OSError, AttributeError):
        return False


class Progress(Listener):
    """A live line on a terminal (stderr); nothing between epochs otherwise; silent with --quiet.
    As a run's listener it says what the run is doing: the lines `make train` shows."""

    def __init__(self, quiet: bool):
        self.live = not quiet and sys.stderr is not None and sys.stderr.isatty()
        self.ansi = self.live and ansi_terminal()
        self.width = 0  # of the live line shown, which clear() overwrites with spaces where there is no ANSI
        self.quiet = quiet
        self.last = 0.0

    def step(self, epoch: int, epochs: int, done: int, total: int, seen: int, seconds: float, loss: float) -> None:
        now = time.monotonic()
        if not self.live or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        rate = seen / seconds if seconds > 0 else 0.0
        eta = (total - done) * seconds / max(1, done)
        line = f"epoch {epoch}/{epochs} [{done:>4}/{total}] {rate:7,.0f} ex/s  loss {loss:.4f}  ETA {eta:4.0f}s "
        self._live("\r" + line)
        self.width = len(line)

    def _live(self, text: str) -> None:
        if not write(sys.stderr, text):
            self.live = False  # the terminal is gone

    def clear(self) -> None:
        if self.live:
            self._live("\r\033[K" if self.ansi else "\r" + " " * self.width + "\r")
            self.width = 0

    def epoch(self, m: dict, epochs: int) -> None:
        self.say(f"epoch {m['epoch']:>2}/{epochs}  train loss {m['train_loss']:.4f} acc {100 * m['train_accuracy']:.2f}%  "
                 f"test loss {m['test_loss']:.4f} acc {100 * m['test_accuracy']:.2f}%  {m['epoch_seconds']:5.1f}s  "
                 f"{m['examples_per_second']:,.0f} ex/s  serial {m['serial_ms_per_step']:.1f} ms/step  rss {m['peak_rss_mb']:.0f} MB")

    # ---- a run's events ----

    def started(self, run) -> None:
        if run.resumed:
            self.say(f"resuming {run.run_dir} at epoch {run.epoch + 1}, step {run.step}")
        self.say(f"python: {run.python} ({KIND} kernels); backend: {run.config.backend}")
        note = slow_path_note() if run.config.backend == "local" else ""  # Ray has no PyPy build: no advice there
        if note:
            self.say(note)
        self.say(f"config: {json.dumps(asdict(run.config))}")

    def step_done(self, run, s: StepDone) -> None:
        self.step(s.epoch, s.epochs, s.step, s.steps, s.seen, s.seconds, s.running_loss)

    def epoch_done(self, run, metrics: dict) -> None:
        self.epoch(metrics, run.config.epochs)

    def stopped(self, run) -> None:
        self.say(f"interrupted: saved {run.run_dir / 'checkpoint.json'} at epoch {run.epoch + 1}, "
                 f"step {run.step}; continue with --resume {run.run_dir}")

    def failed(self, run, error: BaseException) -> None:
        self.clear()

    def finished(self, run) -> None:
        self.say(f"saved {run.run_dir / 'weights.json'}, metrics in {run.run_dir / 'metrics.jsonl'}")

    # ---- lines ----

    def say(self, message: str) -> None:
        """A line on stdout (what the run reports), unless --quiet."""
        if not self.quiet:
            self.clear()
            write(sys.stdout, message + "\n")

    def note(self, message: str) -> None:
        """A line on stderr that --quiet does not hide."""
        self.clear()
        write(sys.stderr, message + "\n")

    def warn(self, message: str) -> None:
        self.note(f"warning: {message}")


def tree_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in [os.getpid(), *pids]:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def tree_pss_mb(pids: list[int]) -> Optional[float]:
    """Proportional set size of the process tree (shared pages split between their users), Linux only."""
    total = 0
    for pid in [os.getpid(), *pids]:
        try:
            total += psutil.Process(pid).memory_full_info().pss  # no pss field off Linux
        except (psutil.Error, AttributeError):
            return None
    return total / 2**20
