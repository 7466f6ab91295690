"""The Ray engine: the same data-parallel step on Ray actors, on one machine or many.

Lifetimes and traffic, written down where they happen:
- `start()` joins a cluster (`address`, else $RAY_ADDRESS) or starts a private local Ray instance
  sized to the workers, bound to 127.0.0.1; `close()` kills the actors and, for a private
  instance, shuts it down, so no Ray process outlives the run.
- The driver ships this package to the cluster (runtime_env py_modules): nodes need neither the
  project nor `datasets/`. The raw train and test bytes are put in the object store once; every
  actor receives the same references when it is created, and keeps the bytes.
- Per step the weights are put once (212 KB for 784-32-32-10) and the same reference goes to every
  actor with its packed shard indices; each actor runs engine.shard_gradient and returns the sum
  as float64 bytes; the driver adds them with engine.reduce_sums in shard order. So --backend ray
  and --backend local with the same --workers end bit-identical.

Faults: an actor that dies (killed, its node lost) is replaced and the step redone from the same
weights. If no CPU is free for the replacement within REPLACE_WAIT seconds, the run goes on with
the actors it has (the batch re-sharded over them: the mean gradient agrees to ~1e-15), says so
once, and takes the replacement back as soon as it starts. Only when no actor at all can run does
the step fail with WorkerCrashed, after which the trainer saves a resumable checkpoint.
"""

from __future__ import annotations

import os
import socket
import sys
from array import array
from typing import Callable, Optional, Sequence

from . import UserError
from .engine import SerialTimer, StopRequested, WorkerCrashed, batch_messages, eval_ranges, reduce_sums
from .mnist import Split
from .network import parameter_count
from .ray_worker import ShardWorker
from .trace import NoTracer, now, symmetric_offset

CONNECT_TIMEOUT = 30.0  # seconds for a cluster address to answer
REPLACE_WAIT = 10.0  # seconds a dead actor's replacement may take to start before the run shrinks
START_WAIT = 120.0  # seconds the first actors may take to start (a cold node imports the package)
MAX_RESTARTS = 3  # replacements within one step before the run stops


def loopback_environment() -> None:
    """Make every Ray process this process starts (a private instance, a test cluster) use
    127.0.0.1 rather than the machine's network address. Read by Ray when it is first imported."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's own switch: "no cluster, loopback only"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def import_ray():
    if "ray" not in sys.modules:
        loopback_environment()
    try:
        import ray
    except ImportError:
        if sys.implementation.name == "pypy":
            raise UserError("--backend ray needs Ray, which has no PyPy build: use a CPython venv "
                            "(make install PYTHON=python3 EXTRAS=dev,ray VENV=.venv-ray)") from None
        raise UserError("--backend ray needs Ray: pip install -e '.[ray]' (or make install EXTRAS=dev,ray)") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A cluster address that does not answer makes ray.init retry for minutes: fail in one line instead."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise UserError(f"--ray-address {address}: nothing answers there ({e}); start the cluster with "
                        "`ray start --head` and pass the address it prints") from None


class RayEngine:
    """`with RayEngine(...) as engine:` — gradient() and evaluate() run on `workers` Ray actors."""

    def __init__(self, sizes: Sequence[int], train: Split, test: Optional[Split], workers: int,
                 address: Optional[str] = None, warn: Optional[Callable[[str], None]] = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.ray = import_ray()
        self.sizes, self.workers, self.pixels = list(sizes), workers, train.pixels
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            check_address(self.address)
        self._data: Optional[tuple] = ((train.images, train.labels), ((test.images, test.labels) if test else (b"", b"")))
        self.test_count = test.count if test else 0
        self.size = parameter_count(sizes)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.serial = SerialTimer()
        self.restarts = 0
        self.bytes_sent = self.bytes_received = 0
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's stop flag, once it has one
        self.tracer = NoTracer()  # the trainer's, with --trace
        self._actors: list = []  # the live actors, in shard order
        self._where: dict = {}  # actor -> (node id, host name, pid)
        self._pending: list = []  # replacements not yet started (no free CPU when they were asked for)
        self._probes: dict = {}  # a pending actor's where() call -> the actor: ready once it starts
        self._params: bytes = bytes(8 * self.size)
        self._params_ref = None
        self._shrunk = False

    # ---- lifetime ----

    def __enter__(self) -> "RayEngine":
        self.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close()

    def start(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            raise UserError("Ray is already initialised in this process")
        package = os.path.dirname(os.path.abspath(__file__))
        runtime_env = {"py_modules": [package]}  # nodes import parallel_nn from what the driver ships
        try:
            if self.address:
                ray.init(address=self.address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=self.workers, include_dashboard=False, runtime_env=runtime_env,
                         logging_level="ERROR", log_to_driver=False)
            cpus = ray.cluster_resources().get("CPU", 0)
            if cpus < 1:
                raise UserError(f"the Ray cluster{' at ' + self.address if self.address else ''} has no CPU for an actor "
                                "(each needs 1); add a node with `ray start --address=... --num-cpus=N`")
            train, test = self._data
            self._data = None
            self._refs = (ray.put(train), ray.put(test))  # once: every actor gets these references
            del train, test
            self._remote = ray.remote(num_cpus=1, max_restarts=0)(ShardWorker)
            wanted = [self._new_actor() for _ in range(self.workers)]
            self._actors = self._await(wanted, START_WAIT if cpus >= self.workers else REPLACE_WAIT)
            if not self._actors:
                raise UserError(f"no Ray actor could start within {START_WAIT:.0f} s (the cluster has {cpus:g} CPUs)")
            if len(self._actors) < self.workers:
                self._shrink_note()
        except BaseException:
            self.close()
            raise

    def _new_actor(self):
        # SPREAD places actors on as many nodes as it can: a node's loss then costs the fewest.
        return self._remote.options(scheduling_strategy="SPREAD").remote(self.sizes, self.pixels, *self._refs)

    def _await(self, actors: list, timeout: float) -> list:
        """The actors among `actors` that start within `timeout` seconds, in order; the others are
        kept pending (they start when capacity appears)."""
        ray = self.ray
        probes = {actor.where.remote(): actor for actor in actors}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=timeout)
        started = []
        for ref in ready:
            try:
                self._where[probes[ref]] = ray.get(ref)
                started.append(probes[ref])
            except ray.exceptions.RayError:
                pass  # died while starting (its node went away): stays pending, and _grow asks for another
        waiting = [a for a in actors if a not in started and a not in self._where]
        self._pending += waiting
        self._probes.update({ref: actor for ref, actor in probes.items() if actor in waiting})
        return [a for a in actors if a in started]

    def _grow(self) -> None:
        """Take back replacements that have started since (capacity returned); cheap when none."""
        if not self._pending:
            return
        ray = self.ray
        ready, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
        for ref in ready:
            actor = self._probes.pop(ref)
            self._pending.remove(actor)
            try:
                self._where[actor] = ray.get(ref)
            except ray.exceptions.RayError:  # it died before it started: ask for another in its place
                replacement = self._new_actor()
                self._pending.append(replacement)
                self._probes[replacement.where.remote()] = replacement
                continue
            self._actors.append(actor)
        if ready and len(self._actors) == self.workers and self._shrunk:
            self.warn(f"capacity is back: training on {self.workers} Ray actors again")
            self._shrunk = False

    def _shrink_note(self) -> None:
        if not self._shrunk:
            self.warn(f"only {len(self._actors)} of {self.workers} Ray actors can run; going on with them (the same "
                      "batch over fewer shards) and growing back when the cluster has room")
            self._shrunk = True

    def close(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            return
        for actor in self._actors + self._pending:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self._actors, self._pending, self._where, self._probes = [], [], {}, {}
        ray.shutdown()  # a private instance's processes go with it; a cluster is only disconnected from

    def worker_pids(self) -> list[int]:
        """Actor pids, for those on this machine (memory accounting); remote ones are not ours to read."""
        here = socket.gethostname()
        return [pid for node, host, pid in (self._where[a] for a in self._actors) if host == here]

    def nodes(self) -> int:
        return len({self._where[a][0] for a in self._actors})

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self._params = array("d", params).tobytes()
        self._params_ref = None  # put lazily, once, by the next step that needs it

    def _call(self, make_calls: Callable[[list], list]) -> list:
        """Run one call per actor (make_calls(actors) -> object refs), replacing actors that die and
        redoing the whole call from the same weights."""
        ray = self.ray
        for attempt in range(MAX_RESTARTS + 1):
            self._grow()
            if self._params_ref is None:
                with self.serial:
                    self._params_ref = ray.put(self._params)
                    self.bytes_sent += len(self._params) * self.nodes()  # one copy travels to each node
            actors = list(self._actors)
            with self.serial, self.tracer.span("dispatch"):
                sent = now()
                refs = make_calls(actors)
            try:
                with self.tracer.span("wait"):
                    done = self._completion_times(refs) if self.tracer.active else {}
                    replies = ray.get(refs)
                for k, (ref, reply) in enumerate(zip(refs, replies)):
                    if reply[-2]:  # spans: moved onto the driver's clock (see trace.py)
                        (start, end), where = reply[-1], self._where[actors[k]]
                        offset, error_us = symmetric_offset(sent, done[ref], end - start, start)
                        self.tracer.worker(k, f"worker {k} @ {where[1]}", reply[-2], offset, alignment_error_us=round(error_us))
                return replies
            except ray.exceptions.RayTaskError:
                raise  # the computation itself failed: a bug, not a lost actor
            except ray.exceptions.RayError as e:
                if self.stop_requested():
                    raise StopRequested(str(e)) from e
                dead = [a for a, r in zip(actors, refs) if _failed(ray, r)]
                self.restarts += 1
                if attempt == MAX_RESTARTS:
                    raise WorkerCrashed(f"Ray actors kept dying ({e.__class__.__name__}); gave up after {MAX_RESTARTS} restarts")
                self._replace(dead or actors)
        raise AssertionError("unreachable")

    def _completion_times(self, refs: list) -> dict:
        """When each call's result became available here (for placing its spans on this clock)."""
        times, left = {}, list(refs)
        while left:
            ready, left = self.ray.wait(left, num_returns=1)
            times[ready[0]] = now()
        return times

    def _replace(self, dead: list) -> None:
        ray = self.ray
        names = ", ".join(f"worker {self._actors.index(a)} @ {self._where[a][1]}" for a in dead if a in self._actors)
        for actor in dead:
            if actor in self._actors:
                self._actors.remove(actor)
                self._where.pop(actor, None)
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.warn(f"{names} died; replacing it and redoing the step")
        self._actors += self._await([self._new_actor() for _ in dead], REPLACE_WAIT)
        if not self._actors:
            raise WorkerCrashed(f"no Ray actor can run: the cluster has no free CPU (waited {REPLACE_WAIT:.0f} s)")
        if len(self._actors) < self.workers:
            self._shrink_note()

    def gradient(self, indices: Sequence[int], augment: Optional[bytes] = None) -> tuple[list[float], float, int]:
        """(sum over `indices` of the per-example gradients, flat; summed loss; number correct)."""
        def calls(actors):
            messages = batch_messages(indices, augment, len(actors))
            self.bytes_sent += sum(len(m[0]) + len(m[1] or b"") for m in messages if m)
            return [actor.gradient.remote(self._params_ref, *m, self.tracer.active) for actor, m in zip(actors, messages) if m]

        replies = self._call(calls)
        with self.serial, self.tracer.span("reduce"):
            self.bytes_received += sum(len(r[0]) for r in replies)
            total = reduce_sums([r[0] for r in replies])
            loss = sum(r[1] for r in replies)
            correct = sum(r[2] for r in replies)
        return total, loss, correct

    def evaluate(self, params: Optional[Sequence[float]] = None) -> tuple[float, list[int]]:
        """(summed test loss, predicted class per test image), the test set split across the actors."""
        if params is not None:
            self.set_params(params)

        def calls(actors):
            return [actor.predict.remote(self._params_ref, *r, self.tracer.active) for actor, r in
                    zip(actors, eval_ranges(self.test_count, len(actors))) if r]

        loss, predictions = 0.0, []
        for part_loss, part, _, _ in self._call(calls):
            loss += part_loss
            predictions.extend(part)
        return loss, predictions


def _failed(ray, ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref)
        return False
    except ray.exceptions.RayError:
        return True
