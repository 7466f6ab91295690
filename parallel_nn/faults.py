"""Fault injection at named points of a run, for tests: inert unless PARALLEL_NN_FAULT is set.

tests/test_faults.py stops or breaks a run at every phase and checks that nothing is lost. It
sets, for the trainer (and so for its workers, which inherit the environment):

    PARALLEL_NN_FAULT=PHASE:FAULT:N   fire FAULT the N-th time this process reaches PHASE
    PARALLEL_NN_FAULT_ONCE=FILE       ...and only once in the whole process tree: the first
                                      process to create FILE fires (a restarted worker does not)

Phases are the trace's names: the parent's "start" (the directory locked, nothing loaded yet), "dispatch", "wait", "reduce", "update", "evaluate",
"epoch", "resume", "write <file> before rename" and "write <file> after rename"; a worker's
"compute", "worker evaluate" and, with --reduce sharded, "worker update" (its slice of the new
weights written, not yet its slice of the optimizer's state). Faults: "sigint" (to the trainer), "sigterm" and "sighup" (to the
process group, as a terminal or `kill -- -PGID` would), "kill" (SIGKILL this process), "stop"
(SIGSTOP this process), "raise" (an exception here), "enospc" (a full disk here).
"""

from __future__ import annotations

import errno
import os
import signal

_SPEC = os.environ.get("PARALLEL_NN_FAULT")
PHASE, FAULT, AT = (_SPEC.rsplit(":", 2) if _SPEC else ("", "", "0"))
_hits = 0


def point(phase: str) -> None:
    """Fire the configured fault if this is its phase and its turn; otherwise return at once."""
    global _hits
    if phase != PHASE:  # the normal case: one string comparison with ""
        return
    _hits += 1
    if _hits != int(AT) or not _first():
        return
    if FAULT == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif FAULT == "sigterm":
        os.killpg(os.getpgrp(), signal.SIGTERM)
    elif FAULT == "sighup":
        os.killpg(os.getpgrp(), signal.SIGHUP)
    elif FAULT == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif FAULT == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif FAULT == "raise":
        raise RuntimeError(f"injected fault at {phase}")
    elif FAULT == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    else:
        raise ValueError(f"PARALLEL_NN_FAULT: unknown fault {FAULT!r}")


def _first() -> bool:
    path = os.environ.get("PARALLEL_NN_FAULT_ONCE")
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
