"""What this platform offers, asked once and by capability, never by the platform's name, so that
each path can be exercised on Linux by taking a capability away (tools/emulate, and
tests/test_platforms.py).

    signals     SIGHUP (a closed terminal) and a thread's signal mask exist on Linux and macOS,
                not on Windows, whose consoles send Ctrl-C and Ctrl-Break (SIGBREAK) instead
    starting    the start methods multiprocessing offers here; the default is the platform's
                (fork on Linux; spawn on macOS, where fork is unsafe with some system
                libraries, and on Windows, where it is the only one)
    memory      anonymous shared memory: shm.py chooses between memfd, an unlinked POSIX
                segment and a named Windows section
    locking     rundir.py chooses between flock and msvcrt's locking
    waiting     select() on pipes' descriptors, which the workers' reduction (its barrier and the
                mailbox's bell: pipes) needs, is POSIX's; Windows' select takes sockets only, so
                there the workers wait on their Connection and only the parent reduces
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import select
import signal
from multiprocessing.connection import wait

SIGHUP = getattr(signal, "SIGHUP", None)
SIGBREAK = getattr(signal, "SIGBREAK", None)  # Windows: Ctrl-Break
# What a terminal sends its whole process group, workers included, and only the trainer acts on
TERMINAL_SIGNALS = frozenset(s for s in (signal.SIGINT, SIGHUP, SIGBREAK) if s is not None)
# What asks a run to stop (after saving): those, and SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + tuple(s for s in (SIGHUP, SIGBREAK) if s is not None)
CAN_MASK = hasattr(signal, "pthread_sigmask")
SELECT_PIPES = hasattr(select, "poll")  # POSIX: select() takes any descriptor
START_METHODS = tuple(m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods())


def readable(objects: list, timeout: float) -> list:
    """multiprocessing.connection.wait's answer (pipes, descriptors and sentinels ready to read, or
    closed), by one poll() where it takes any descriptor (POSIX): wait() builds a selector every
    call, which on PyPy cost ~0.1 ms of the trainer's step, between its own shard and the answer
    it reads. The trainer, its workers and the barrier all wait through here."""
    if not SELECT_PIPES:
        return wait(objects, timeout)
    poll, by_fd = select.poll(), {}
    for o in objects:
        fd = o if isinstance(o, int) else o.fileno()
        by_fd[fd] = o
        poll.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poll.poll(math.ceil(timeout * 1000))]  # ms, rounded up as wait() does (PyPy truncates)


@contextlib.contextmanager
def signals_blocked(signals):
    """Block `signals` in this thread inside the block. A mask survives fork and exec, so a process
    started inside starts with them blocked (until it unblocks them). Where there is no signal mask
    but a Windows console, the console's "ignore Ctrl-C" attribute, which child processes inherit,
    stands in for it (the trainer itself ignores Ctrl-C for those moments). Elsewhere, nothing: a
    worker then ignores the terminal's signals from its first line on."""
    signals = {s for s in signals if s is not None}
    if not signals:
        yield
    elif CAN_MASK:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    elif signal.SIGINT in signals and _console() is not None:
        _console().SetConsoleCtrlHandler(None, True)
        try:
            yield
        finally:
            _console().SetConsoleCtrlHandler(None, False)
    else:
        yield


def _console():
    """Windows' kernel32, where there is one (ctypes.windll exists only there)."""
    try:
        import ctypes

        return ctypes.windll.kernel32
    except (ImportError, AttributeError):
        return None


def unblock(signals) -> None:
    if CAN_MASK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))
