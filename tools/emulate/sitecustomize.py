"""Linux with another platform's API surface: what parallel_nn's macOS and Windows code paths are
tested on here (tests/test_platforms.py). Put this folder first on PYTHONPATH and set
PARALLEL_NN_EMULATE to `macos` or `windows`; Python imports this module at start-up, in every
process (spawned workers included, since they inherit the environment), and takes away what that
platform lacks, so that the code, which chooses by capability, takes the other platform's path:

    macos     no os.memfd_create; spawn is the default start method (fork and forkserver are
              still offered, as on macOS)
    windows   no os.memfd_create, no fcntl, no signal.SIGHUP, no signal.pthread_sigmask, no
              select.poll (parallel_nn's sign that select() takes pipes: Windows' takes sockets
              only), no prctl in the C library (nothing kills a worker whose trainer died), and
              only the spawn start method

Windows' file locking (msvcrt.locking) is stood in for by flock, which behaves the same way for
what the run lock asks of it. What it cannot take away or offer, and so is not exercised here:
Windows' named shared memory (the emulated Windows has POSIX segments, so it takes the macOS
path), its consoles (Ctrl-Break, and the inherited "ignore Ctrl-C" that stands in for a signal
mask while workers start), and what its select() refuses.
"""

import os
import sys

_platform = os.environ.get("PARALLEL_NN_EMULATE", "")

if _platform in ("macos", "windows"):
    import multiprocessing
    import multiprocessing.context

    if hasattr(os, "memfd_create"):
        del os.memfd_create
    multiprocessing.set_start_method("spawn", force=True)
    if _platform == "windows":
        import signal

        import fcntl
        import types

        def _locking(fd, mode, nbytes, _flock=fcntl.flock):
            """msvcrt.locking, as far as parallel_nn uses it (LK_NBLCK, LK_UNLCK), on flock: a lock
            per open file, released when the process dies, refused to other opens (EACCES)."""
            if mode == 0:  # LK_UNLCK
                _flock(fd, fcntl.LOCK_UN)
                return
            try:
                _flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode in (2, 4) else 0))
            except BlockingIOError:
                raise PermissionError(13, "Permission denied") from None

        import subprocess  # noqa: F401 -- before msvcrt appears: 3.12's subprocess takes its presence for Windows

        sys.modules["msvcrt"] = types.ModuleType("msvcrt")
        sys.modules["msvcrt"].__dict__.update(LK_UNLCK=0, LK_LOCK=1, LK_NBLCK=2, LK_RLCK=3, LK_NBRLCK=4, locking=_locking)
        sys.modules["fcntl"] = None  # `import fcntl` raises ImportError from here on

        import ctypes
        import hashlib  # noqa: F401 -- PyPy's needs select.poll at import
        import select

        del select.poll

        class _NoPrctl(ctypes.CDLL):
            def __getattr__(self, name):
                if name == "prctl":
                    raise AttributeError(name)
                return super().__getattr__(name)

        ctypes.CDLL = _NoPrctl
        for _name in ("SIGHUP", "pthread_sigmask"):
            if hasattr(signal, _name):
                delattr(signal, _name)
        for _method in ("fork", "forkserver"):
            multiprocessing.context._concrete_contexts.pop(_method, None)
        multiprocessing.context.DefaultContext.get_all_start_methods = lambda self: ["spawn"]
        multiprocessing.get_all_start_methods = lambda: ["spawn"]
elif _platform:
    raise SystemExit(f"PARALLEL_NN_EMULATE={_platform!r}: expected 'macos' or 'windows'")
