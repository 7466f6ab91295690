"""Anonymous shared memory: segments that cannot outlive the processes using them.

A named POSIX segment (multiprocessing.shared_memory) lives in /dev/shm until someone unlinks it:
if the trainer and its resource tracker die together (SIGKILL or SIGHUP to the process group, a
closed terminal), it stays there, holding RAM until reboot. A memfd has no name. Its memory is
freed when the last descriptor and the last mapping of it are gone, however the processes end.

Workers receive the descriptors, not names: inherited under fork, passed by multiprocessing's own
fd-passing under spawn and forkserver (the way it passes a Pipe's ends).
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import reduction
from typing import Optional


class Segment:
    """`size` bytes of shared memory; `buf` is a memoryview of this process's mapping of it."""

    def __init__(self, size: int, fd: Optional[int] = None):
        self.size = max(1, size)  # mmap refuses length 0
        if fd is None:
            fd = os.memfd_create("parallel_nn")
            os.ftruncate(fd, self.size)
        self.fd = fd
        self._map: Optional[mmap.mmap] = mmap.mmap(fd, self.size)
        self.buf: Optional[memoryview] = memoryview(self._map)

    def unmap(self) -> None:
        """Drop this process's mapping but keep the descriptor (to hand to workers started later)."""
        if self._map is not None:
            self.buf.release()
            self._map.close()
            self._map = self.buf = None

    def close(self) -> None:
        self.unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def handle(self) -> "SegmentHandle":
        return SegmentHandle(self.fd, self.size)


class SegmentHandle:
    """What a worker is given to attach a segment: pickles as a passed file descriptor."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def __reduce__(self):
        # Called while multiprocessing pickles a spawn/forkserver child's arguments: DupFd then
        # arranges for the child to receive a duplicate of the descriptor.
        return _rebuild, (reduction.DupFd(self.fd), self.size)

    def attach(self) -> Segment:
        return Segment(self.size, self.fd)


def _rebuild(dup, size: int) -> SegmentHandle:
    return SegmentHandle(dup.detach(), size)
