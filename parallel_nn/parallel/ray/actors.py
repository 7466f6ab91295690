"""The Ray engine: the same data-parallel step on Ray actors, on one machine or many.

Lifetimes and traffic, written down where they happen:
- `start()` joins a cluster (`address`, else $RAY_ADDRESS) or starts a private local Ray instance
  sized to the workers, bound to 127.0.0.1; `close()` kills the actors and, for a private
  instance, shuts it down, so no Ray process outlives the run.
- The driver ships this package to the cluster (runtime_env py_modules): nodes need neither the
  project nor `datasets/`. The raw train and test bytes are put in the object store once; every
  actor receives the same references when it is created, and keeps the bytes.
- Per step the weights are put once (212 KB for 784-32-32-10) and the same reference goes to every
  actor with its packed shard indices; each actor runs shards.shard_gradient and returns the sum
  as float64 bytes; the driver adds them with shards.reduce_sums in shard order. So --backend ray
  and --backend local with the same --workers end bit-identical.

Faults: an actor that dies (killed, its node lost), or that has not answered within the watchdog's
limit (`self.watchdog`, base.Watchdog: stopped, deadlocked, its node unreachable), is killed,
replaced and the step redone from the same weights: the reduction is in shard order, so the redone
step gives the same sums to the bit. If no CPU is free for the replacement within REPLACE_WAIT
seconds, the run goes on with the actors it has (the batch re-sharded over them: the mean gradient
agrees to ~1e-15), says so once, and takes the replacement back as soon as it starts. Only when no
actor at all can run does the step fail with WorkerCrashed, after which the trainer saves a
resumable checkpoint; so does a step that needed more than MAX_RESTARTS replacements (deaths and
timeouts counted together).

Authentication and reaching the cluster: auth.py.
"""

from __future__ import annotations

import os
import socket
import sys
from array import array
from typing import Callable, Optional, Sequence

from parallel_nn import UserError
from parallel_nn.data.mnist import Split
from parallel_nn.nn.network import parameter_count
from parallel_nn.parallel.base import Engine, StopRequested, WorkerCrashed
from parallel_nn.parallel.ray.auth import check_address, check_auth
from parallel_nn.parallel.ray.worker import ShardWorker
from parallel_nn.parallel.shards import batch_messages, eval_ranges, reduce_sums
from parallel_nn.parallel.trace import now, symmetric_offset
import parallel_nn

REPLACE_WAIT = 10.0  # seconds a dead actor's replacement may take to start before the run shrinks
START_WAIT = 120.0  # seconds the first actors may take to start (a cold node imports the package)
MAX_RESTARTS = 3  # replacements within one step before the run stops (deaths and timeouts alike)


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


class RayActors:
    """The Ray instance or cluster, and the actors on it, in shard order: started, replaced when
    they die (shrinking when no CPU is free, growing back when one is), killed at the end."""

    def __init__(self, ray, sizes: Sequence[int], pixels: int, workers: int, address: Optional[str],
                 warn: Callable[[str], None]):
        self.ray, self.sizes, self.pixels, self.workers, self.address, self.warn = ray, sizes, pixels, workers, address, warn
        self.live: list = []  # the live actors, in shard order
        self.where: dict = {}  # actor -> (node id, host name, pid)
        self._pending: list = []  # replacements not yet started (no free CPU when they were asked for)
        self._probes: dict = {}  # a pending actor's where() call -> the actor: ready once it starts
        self._shrunk = False

    def start(self, data: tuple) -> None:
        """Start Ray (or join the cluster), put `data` (train and test bytes) once, start the actors."""
        ray = self.ray
        package = os.path.dirname(os.path.abspath(parallel_nn.__file__))  # the whole package, not this folder
        runtime_env = {"py_modules": [package]}  # nodes import parallel_nn from what the driver ships
        if self.address:
            ray.init(address=self.address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
        else:
            # Ray starts its workers at niceness 15 so that its own daemons keep a core under load;
            # here the actors are the computation, one per CPU, and every other process of the
            # machine at niceness 0 (the driver included) took its time from them: 2-worker epochs
            # spread 0.9-1.5x the local engine's. A private instance runs them as the local engine
            # runs its workers. (A cluster joined with --ray-address keeps its own setting.)
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=self.workers, include_dashboard=False, runtime_env=runtime_env,
                     logging_level="ERROR", log_to_driver=False)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < 1:
            raise UserError(f"the Ray cluster{' at ' + self.address if self.address else ''} has no CPU for an actor "
                            "(each needs 1); add a node with `ray start --address=... --num-cpus=N`")
        self._refs = tuple(ray.put(blobs) for blobs in data)  # once: every actor gets these references
        del data
        self._remote = ray.remote(num_cpus=1, max_restarts=0)(ShardWorker)
        wanted = [self._new_actor() for _ in range(self.workers)]
        self.live = self._await(wanted, START_WAIT if cpus >= self.workers else REPLACE_WAIT)
        if not self.live:
            raise UserError(f"no Ray actor could start within {START_WAIT:.0f} s (the cluster has {cpus:g} CPUs)")
        if len(self.live) < self.workers:
            self._shrink_note()

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
                self.where[probes[ref]] = ray.get(ref)
                started.append(probes[ref])
            except ray.exceptions.RayError:
                pass  # died while starting (its node went away): stays pending, and grow asks for another
        waiting = [a for a in actors if a not in started and a not in self.where]
        self._pending += waiting
        self._probes.update({ref: actor for ref, actor in probes.items() if actor in waiting})
        return [a for a in actors if a in started]

    def grow(self) -> None:
        """Take back replacements that have started since (capacity returned); cheap when none."""
        if not self._pending:
            return
        ray = self.ray
        ready, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
        for ref in ready:
            actor = self._probes.pop(ref)
            self._pending.remove(actor)
            try:
                self.where[actor] = ray.get(ref)
            except ray.exceptions.RayError:  # it died before it started: ask for another in its place
                replacement = self._new_actor()
                self._pending.append(replacement)
                self._probes[replacement.where.remote()] = replacement
                continue
            self.live.append(actor)
        if ready and len(self.live) == self.workers and self._shrunk:
            self.warn(f"capacity is back: training on {self.workers} Ray actors again")
            self._shrunk = False

    def _shrink_note(self) -> None:
        if not self._shrunk:
            self.warn(f"only {len(self.live)} of {self.workers} Ray actors can run; going on with them (the same "
                      "batch over fewer shards) and growing back when the cluster has room")
            self._shrunk = True

    def replace(self, dead: list, what: str) -> None:
        ray = self.ray
        names = ", ".join(f"worker {self.live.index(a)} @ {self.where[a][1]} (pid {self.where[a][2]})"
                          for a in dead if a in self.live)
        for actor in dead:
            if actor in self.live:
                self.live.remove(actor)
                self.where.pop(actor, None)
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.warn(f"{names} {what}; replacing it and redoing the step")
        self.live += self._await([self._new_actor() for _ in dead], REPLACE_WAIT)
        if not self.live:
            raise WorkerCrashed(f"no Ray actor can run: the cluster has no free CPU (waited {REPLACE_WAIT:.0f} s)")
        if len(self.live) < self.workers:
            self._shrink_note()

    def close(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            return
        for actor in self.live + self._pending:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.live, self._pending, self.where, self._probes = [], [], {}, {}
        ray.shutdown()  # a private instance's processes go with it; a cluster is only disconnected from


class RayEngine(Engine):
    """`with RayEngine(...) as engine:` — gradient() and evaluate() run on `workers` Ray actors."""

    def __init__(self, sizes: Sequence[int], train: Split, test: Optional[Split], workers: int,
                 address: Optional[str] = None, warn: Optional[Callable[[str], None]] = None):
        super().__init__(sizes, workers, warn)
        self.ray = import_ray()
        self.pixels = train.pixels
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            check_address(self.address)
            check_auth(self.ray, self.address, self.warn)
        self._data: Optional[tuple] = ((train.images, train.labels), ((test.images, test.labels) if test else (b"", b"")))
        self.test_count = test.count if test else 0
        self.size = parameter_count(sizes)
        self.actors = RayActors(self.ray, self.sizes, self.pixels, workers, self.address, self.warn)
        self._params: bytes = bytes(8 * self.size)
        self._params_ref = None

    def start(self) -> None:
        if self.ray.is_initialized():
            raise UserError("Ray is already initialised in this process")
        data, self._data = self._data, None
        try:
            self.actors.start(data)
        except BaseException:
            self.close()
            raise

    def close(self, graceful: bool = True) -> None:
        self.actors.close()  # an actor's work in flight is never worth waiting for

    def worker_pids(self) -> list[int]:
        """Actor pids, for those on this machine (memory accounting); remote ones are not ours to read."""
        here = socket.gethostname()
        return [pid for node, host, pid in (self.actors.where[a] for a in self.actors.live) if host == here]

    def nodes(self) -> int:
        return len({self.actors.where[a][0] for a in self.actors.live})

    # ---- the step ----

    def set_params(self, params: Sequence[float]) -> None:
        self._params = array("d", params).tobytes()
        self._params_ref = None  # put lazily, once, by the next step that needs it

    def _call(self, work: str, make_calls: Callable[[list], list], meanwhile: Optional[Callable[[], None]] = None) -> list:
        """Run one call per actor (make_calls(actors) -> object refs), replacing actors that die or
        do not answer within the watchdog's limit for `work` ("grad" or "eval"), and redoing the whole call from the
        same weights. `meanwhile` runs once, while the first attempt's calls are out."""
        ray = self.ray
        for attempt in range(MAX_RESTARTS + 1):
            self.actors.grow()
            if self._params_ref is None:
                with self.serial:
                    self._params_ref = ray.put(self._params)
                    self.bytes_sent += len(self._params) * self.nodes()  # one copy travels to each node
            actors = list(self.actors.live)
            limit = self.watchdog.limit(work)
            with self.serial, self.tracer.span("dispatch"):
                sent = now()
                refs = make_calls(actors)
            if meanwhile is not None and attempt == 0:
                meanwhile()
            try:
                with self.tracer.span("wait"):
                    replies, done, late = self._collect(refs, sent + int(limit * 1e9))
            except ray.exceptions.RayTaskError:
                raise  # the computation itself failed: a bug, not a lost actor
            except ray.exceptions.RayError as e:
                if self.stop_requested():
                    raise StopRequested(str(e)) from e
                dead = [a for a, r in zip(actors, refs) if _failed(ray, r)]
                self._lost(attempt, dead or actors, "died", f"Ray actors kept dying ({e.__class__.__name__})")
                continue
            if late:
                if self.stop_requested():
                    raise StopRequested(f"{len(late)} Ray actor(s) did not answer while stopping")
                self._lost(attempt, [actors[k] for k in late], f"did not answer within {limit:g} s (killed)",
                           f"Ray actors kept failing (the last did not answer within {limit:g} s)")
                continue
            self.watchdog.answered(work, (max(done.values(), default=sent) - sent) / 1e9)
            self._trace(actors, refs, replies, sent, done)
            return replies
        raise AssertionError("unreachable")

    def _lost(self, attempt: int, dead: list, what: str, failing: str) -> None:
        self.restarts += 1
        if attempt == MAX_RESTARTS:
            raise WorkerCrashed(f"{failing}; gave up after {MAX_RESTARTS} restarts")
        self.actors.replace(dead, what)

    def _trace(self, actors: list, refs: list, replies: list, sent: int, done: dict) -> None:
        for k, (ref, reply) in enumerate(zip(refs, replies)):
            if reply[-2]:  # spans: moved onto the driver's clock (see trace.py)
                (start, end), where = reply[-1], self.actors.where[actors[k]]
                offset, error_us = symmetric_offset(sent, done[ref], end - start, start)
                self.tracer.worker(k, f"worker {k} @ {where[1]}", reply[-2], offset, alignment_error_us=round(error_us))

    def _collect(self, refs: list, deadline: int) -> tuple[list, dict, list]:
        """(the replies in order, when each arrived (trace.now()), the indices of the calls still
        unanswered at `deadline` (trace.now() units: ns)). Raises RayError for an actor that died.
        One at a time when tracing (each reply's arrival places its spans), else all at once."""
        ray, index = self.ray, {ref: k for k, ref in enumerate(refs)}
        replies, done, left = [None] * len(refs), {}, list(refs)
        while left:
            wait = max(0, deadline - now()) / 1e9
            ready, left = ray.wait(left, num_returns=1 if self.tracer.active else len(left), timeout=wait)
            arrived = now()
            for ref in ready:
                done[ref] = arrived
                replies[index[ref]] = ray.get(ref)  # a dead actor's call raises here
            if left and (not ready or now() >= deadline):
                return replies, done, sorted(index[ref] for ref in left)
        return replies, done, []

    def gradient(self, indices: Sequence[int], augment: Optional[bytes] = None,
                 meanwhile: Optional[Callable[[], None]] = None) -> tuple[list[float], float, int]:
        """(sum over `indices` of the per-example gradients, flat; summed loss; number correct);
        `meanwhile`: work for the driver while the actors compute."""
        def calls(actors):
            messages = batch_messages(indices, augment, len(actors))
            self.bytes_sent += sum(len(m[0]) + len(m[1] or b"") for m in messages if m)
            return [actor.gradient.remote(self._params_ref, *m, self.tracer.active) for actor, m in zip(actors, messages) if m]

        replies = self._call("grad", calls, meanwhile)
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
        for part_loss, part, _, _ in self._call("eval", calls):
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
