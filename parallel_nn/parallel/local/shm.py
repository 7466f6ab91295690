"""Anonymous shared memory: segments that cannot outlive the processes using them.

A named POSIX segment (multiprocessing.shared_memory) lives in /dev/shm until someone unlinks it:
if the trainer and its resource tracker die together (SIGKILL or SIGHUP to the process group, a
closed terminal), it stays there, holding RAM until reboot. So a segment here never keeps a name
longer than it takes to open it. Chosen by what the platform offers (capabilities.py):

    memfd       Linux: os.memfd_create, a segment that never has a name.
    posix       macOS (no memfd): shm_open with a fresh random name, exclusively, then shm_unlink at
                once, before anything else happens; from then on it is nameless like a memfd.
                The weakest link: a SIGKILL in the microseconds between the two calls would leave
                that one name behind.
    windows     Windows (no POSIX segments): a named section (mmap's tagname). Windows frees a
                section with its last handle, so nothing can leak; workers open it by name. The
                parent keeps its own mapping of every section for the whole run, so that workers
                started later (after a worker died) still find them.

With memfd and posix, workers receive the descriptors, not names: inherited under fork, passed by
multiprocessing's own fd-passing under spawn and forkserver (the way it passes a Pipe's ends).
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
from typing import Optional

from parallel_nn import UserError

try:
    import _posixshmem  # CPython's and PyPy's shm_open / shm_unlink, where POSIX has them
except ImportError:
    _posixshmem = None

KIND = "memfd" if hasattr(os, "memfd_create") else "posix" if _posixshmem is not None else "windows"


class Segment:
    """`size` bytes of shared memory; `buf` is a memoryview of this process's mapping of it.
    Made new (fd and name None) or attached, from a descriptor (memfd, posix) or a name (windows)."""

    def __init__(self, size: int, fd: Optional[int] = None, name: Optional[str] = None):
        self.size = max(1, size)  # mmap refuses length 0
        self.fd, self.name = -1, name
        if KIND == "windows":
            self.name = name or f"parallel_nn_{os.getpid()}_{secrets.token_hex(8)}"
            self._map: Optional[mmap.mmap] = mmap.mmap(-1, self.size, tagname=self.name)
        else:
            self.fd = fd if fd is not None else _anonymous(self.size)
            self._map = mmap.mmap(self.fd, self.size)
        self.buf: Optional[memoryview] = memoryview(self._map)

    def unmap(self) -> None:
        """Drop this process's mapping but keep the descriptor (to hand to workers started later).
        A Windows section lives only while someone maps it: the parent keeps its mapping there."""
        if self._map is not None and KIND != "windows":
            self.buf.release()
            self._map.close()
            self._map = self.buf = None

    def close(self) -> None:
        if self._map is not None:
            self.buf.release()
            self._map.close()
            self._map = self.buf = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def handle(self) -> "SegmentHandle":
        return SegmentHandle(self.fd, self.size, self.name)


def _anonymous(size: int) -> int:
    """A descriptor of `size` bytes of shared memory that no name leads to."""
    if KIND == "memfd":
        fd = os.memfd_create("parallel_nn")
    else:
        for _ in range(100):
            name = f"/parallel_nn_{secrets.token_hex(8)}"
            try:
                fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
            except FileExistsError:
                continue
            _posixshmem.shm_unlink(name)  # nameless from here on: freed with its last descriptor and mapping
            break
        else:
            raise OSError("could not create a shared memory segment (100 names taken)")
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EFBIG:  # shared memory counts as a file: RLIMIT_FSIZE (`ulimit -f`) applies
            raise UserError(f"cannot make {size:,} bytes of shared memory: it is larger than the file size limit "
                            f"of this shell (ulimit -f {_file_size_limit()}); raise it with `ulimit -f unlimited`") from None
        raise
    return fd


def _file_size_limit() -> str:
    try:
        import resource
    except ImportError:
        return "?"
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft // 1024)  # in the shell's 1024-byte blocks


class SegmentHandle:
    """What a worker is given to attach a segment: pickles as a passed file descriptor (memfd,
    posix) or as the section's name (windows)."""

    def __init__(self, fd: int, size: int, name: Optional[str] = None):
        self.fd, self.size, self.name = fd, size, name

    def __reduce__(self):
        if KIND == "windows":
            return SegmentHandle, (-1, self.size, self.name)
        from multiprocessing import reduction

        # Called while multiprocessing pickles a spawn/forkserver child's arguments: DupFd then
        # arranges for the child to receive a duplicate of the descriptor.
        return _rebuild, (reduction.DupFd(self.fd), self.size)

    def attach(self) -> Segment:
        return Segment(self.size, None if KIND == "windows" else self.fd, self.name)


def _rebuild(dup, size: int) -> SegmentHandle:
    return SegmentHandle(dup.detach(), size)
