"""A barrier for the workers' reduction made of two anonymous pipes: nothing named, nothing to leak.

multiprocessing's Barrier is four named POSIX semaphores under spawn and forkserver, which only the
resource tracker removes: SIGKILL to the process group (the tracker included) leaves them in
/dev/shm. Pipes have no name; the kernel frees them with the last descriptor.

Party 0 is the gatherer: it takes one byte per other party from `arrive`, then puts one byte per
other party into `release`; every other party puts its byte into `arrive` and takes one from
`release`. Party 0 is the trainer itself (pool.py), which waits for the arrivals its own way, also
watching its workers for deaths and silence (exchange.py): `arrivals` and `release` are its steps. It can be reused step after step: a party can only reach the next step's barrier once
the parent has dispatched that step, which it does only after every party has left this one, so
no party ever takes a byte meant for an earlier step. A waiting party checks every second that its
parent is still alive, so a worker never waits for ever on a run that is gone.
"""

from __future__ import annotations

import os
from multiprocessing import reduction
from typing import Callable

from parallel_nn.capabilities import readable


class PipeBarrier:
    def __init__(self, parties: int, fds: tuple[int, int, int, int] | None = None):
        self.parties = parties
        if fds is None:
            arrive, release = os.pipe(), os.pipe()
            fds = (*arrive, *release)
            os.set_blocking(fds[0], False)  # the read ends: a wake-up may find the byte taken by another party
            os.set_blocking(fds[2], False)
        self.fds = fds

    def __reduce__(self):
        # pickled only while spawn or forkserver start a worker: the descriptors are passed to it
        return _rebuild, (self.parties, *(reduction.DupFd(fd) for fd in self.fds))

    def wait(self, party: int, alive: Callable[[], bool]) -> None:
        """Return once every party has called wait(); raise BrokenPipeError if `alive()` turns false."""
        arrive_r, arrive_w, release_r, release_w = self.fds
        others = self.parties - 1
        if party == 0:
            _take(arrive_r, others, alive)
            self.release()
        else:
            os.write(arrive_w, b"\0")
            _take(release_r, 1, alive)

    @property
    def arrive(self) -> int:
        """What party 0 waits on: readable when other parties have arrived."""
        return self.fds[0]

    def arrivals(self, most: int) -> int:
        """Party 0's: how many other parties arrived since it last looked (at most `most`)."""
        try:
            return len(os.read(self.fds[0], most))
        except BlockingIOError:
            return 0

    def release(self) -> None:
        """Party 0's, once every other party has arrived: let them all go."""
        if self.parties > 1:
            os.write(self.fds[3], bytes(self.parties - 1))

    def close(self) -> None:
        self.fds = close_all(self.fds)


def close_all(fds: tuple) -> tuple:
    """Close every descriptor (one already closed is fine); what is left: -1 for each."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return (-1,) * len(fds)


def _take(fd: int, count: int, alive: Callable[[], bool]) -> None:
    while count:
        if not readable([fd], 1.0):
            if not alive():
                raise BrokenPipeError("the barrier's run is gone")
            continue
        try:
            count -= len(os.read(fd, count))
        except BlockingIOError:  # another party took it first
            continue


def _rebuild(parties: int, *dups) -> PipeBarrier:
    return PipeBarrier(parties, tuple(dup.detach() for dup in dups))
