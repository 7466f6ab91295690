"""Run directories: never two runs in one, never a finished run replaced by accident.

- A new run refuses a directory that already holds a run (cli.py says so before anything starts);
  `--overwrite` replaces it on purpose, `--resume` continues it.
- A default directory, runs/<timestamp>, is created with an exclusive mkdir; a name already taken
  (another run, even one started in the same second) gets a suffix: runs/<timestamp>-2, -3, ...
- A running trainer holds `.lock` in its directory: with fcntl.flock where there is fcntl (Linux,
  macOS), else with msvcrt.locking on one byte far past the pid (Windows, which has no shared
  locks: a reader that asks takes the byte and lets it go). The kernel drops the lock when the
  process exits however it dies, so a crash or SIGKILL leaves nothing that blocks `--resume`; the
  file keeps the holder's pid only to name it in the refusal.
- A run directory's own files are never symbolic links: a link would have the trainer write (the
  lock's pid, step lines) wherever it points, outside the run. A run that finds one refuses to
  start, naming it; the files it appends to are opened without following a link.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Optional

import psutil

from parallel_nn import UserError
from parallel_nn.parallel.trace import is_trace

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

RUN_FILES = ("config.json", "checkpoint.json", "weights.json", "metrics.jsonl", "progress.jsonl")
LOCK_NAME = ".lock"
LOCK_BYTE = 1 << 20  # msvcrt: the byte locked, past the pid (a locked range cannot be read on Windows)


def run_files(directory: str | Path) -> list[str]:
    """The run files already in `directory` (none if it does not exist); a link counts, dangling or not."""
    directory = Path(directory)
    return [name for name in RUN_FILES if os.path.lexists(directory / name)]


def refuse_links(directory: str | Path) -> None:
    """UserError naming the first of the run's files (or its lock) that is a symbolic link."""
    for name in (LOCK_NAME, *RUN_FILES):
        if os.path.islink(Path(directory) / name):
            raise _link_refused(Path(directory) / name)


def _link_refused(path: Path) -> UserError:
    return UserError(f"{path} is a symbolic link; a run directory's files are never links (the trainer would "
                     "write where it points, outside the run): remove it, or use another --run-dir")


def open_file(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """os.open of one of a run's files, never through a symbolic link (O_NOFOLLOW where the system
    has it, else a look first), never waiting (O_NONBLOCK: a FIFO would block the open), and only
    a regular file with no other name (a hard link would have the trainer write into a file
    elsewhere): anything else is a UserError that names it."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if not nofollow and os.path.islink(path):
        raise _link_refused(Path(path))
    try:
        fd = os.open(path, flags | nofollow | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise _link_refused(Path(path)) from None
        if e.errno == errno.ENXIO:  # a FIFO with no reader, opened to write
            raise UserError(f"{path} is not a regular file (a FIFO?): remove it") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file (a FIFO, a device or a directory)" if not stat.S_ISREG(info.st_mode) else
               f"has {info.st_nlink} names (a hard link): the trainer would write into the other one too"
               if info.st_nlink > 1 and flags & (os.O_WRONLY | os.O_RDWR) else None)
    if problem:
        os.close(fd)
        raise UserError(f"{path} {problem}; remove it, or use another --run-dir")
    return fd


def create_default(base: str | Path = "runs") -> Path:
    """A new, empty runs/<timestamp>[-n]: the exclusive mkdir is what makes two runs never share one."""
    base = Path(base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            candidate = base / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"cannot create a run directory under {base}: {e.strerror or e}; "
                        "pass a writable --run-dir") from None
    raise UserError(f"could not create a new run directory under {base}")


_held: set[int] = set()  # this process's lock descriptors


def _forget_locks_in_child() -> None:
    # A forked worker would share the trainer's flock (it belongs to the open file, which fork
    # shares): a trainer killed while a worker lingers would keep its directory locked.
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class RunLock:
    """`with RunLock(run_dir):` — this process is the only trainer writing run_dir."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise UserError(f"cannot use {self.path.parent} as a run directory ({e.filename or self.path}: "
                            f"{e.strerror or e}); choose a writable --run-dir") from None
        if not _lock(fd, exclusive=True):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another trainer (pid {holder}); "
                            "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _held.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            _unlock(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the lock anyway
            self._fd = None

    def discard(self, remove_directory: bool = False) -> None:
        """A start that failed: take the lock file away while still holding it (and the directory,
        if it was made for this run and is now empty), so nothing of the attempt is left."""
        try:
            try:
                self.path.unlink()
            except PermissionError:  # Windows: an open file cannot be removed; let go of it first
                self.__exit__()
                self.path.unlink()
            if remove_directory:
                self.path.parent.rmdir()
        except OSError:
            pass


def holder(run_dir: str | Path) -> Optional[int]:
    """The pid of the trainer holding run_dir, or None if no process holds it."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    fd = open_file(path, os.O_RDONLY if fcntl is not None else os.O_RDWR)
    try:
        if _lock(fd, exclusive=False):
            _unlock(fd)
            return None  # we could take it: nobody holds it
        text = os.read(fd, 64).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def _lock(fd: int, exclusive: bool) -> bool:
    """Take the run lock on the open `.lock` (shared, where there are shared locks), without
    waiting: whether it was taken."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    os.lseek(fd, LOCK_BYTE, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


def _unlock(fd: int) -> None:
    if fcntl is not None:
        return  # flock: closing the descriptor releases it
    os.lseek(fd, LOCK_BYTE, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass
    finally:
        os.lseek(fd, 0, os.SEEK_SET)


def running(run_dir: str | Path) -> bool:
    """Whether a trainer holds run_dir now, for a reader that looks often (the live page).

    holder() takes a shared lock for an instant, which a trainer starting at that very instant
    would take for another trainer: so it is asked only when the pid in the lock file is alive (a
    trainer that has exited leaves its pid there; one that is starting has written none yet)."""
    try:
        fd = open_file(Path(run_dir) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            text = os.read(fd, 64).decode(errors="replace").strip()  # a pid; never a whole file
        finally:
            os.close(fd)
    except (OSError, UserError):
        return False
    if text.isdigit() and not psutil.pid_exists(int(text)):  # not os.kill(pid, 0): on Windows that is a Ctrl-C
        return False
    try:
        return holder(run_dir) is not None
    except (OSError, UserError):
        return False


def remove_leftovers(run_dir: str | Path) -> None:
    """The temporary files (atomic.py) a trainer killed mid-write left: the caller holds the lock,
    so no writer is alive that could still rename one into place."""
    for name in RUN_FILES:
        for leftover in Path(run_dir).glob(f".{name}.*.tmp"):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


def clear(run_dir: str | Path) -> None:
    """--overwrite: remove the old run's files (the caller holds the lock)."""
    for name in RUN_FILES:
        try:
            (Path(run_dir) / name).unlink()
        except FileNotFoundError:
            pass


def check_trace_target(path: str | Path, run_dir: Path, data_dir: str, init: Optional[str] = None) -> None:
    """Refuse a --trace path whose file is not a trace to replace: one of a run's files (by its
    name, in any directory), a file in the data directory, the --init weights, or any existing file
    that is not a trace. Checked before anything is written: the trace is written there at once."""
    path = Path(path)
    real = os.path.realpath(path)
    data = os.path.realpath(data_dir)
    if path.name in (*RUN_FILES, LOCK_NAME):
        why = "that is a run's own file"
    elif os.path.commonpath([real, data]) == data:
        why = f"that is in the data directory {data_dir}"
    elif init and real == os.path.realpath(init):
        why = "that is the --init weights"
    elif os.path.lexists(path) and not is_trace(path):
        why = "that file exists and is not a trace"
    else:
        return
    raise UserError(f"--trace {path}: {why}, which the trace would replace; choose another file, e.g. {run_dir / 'trace.json'}")
