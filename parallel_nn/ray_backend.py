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

Faults: an actor that dies (killed, its node lost), or that has not answered within the watchdog's
limit (`self.watchdog`, engine.Watchdog: stopped, deadlocked, its node unreachable), is killed,
replaced and the step redone from the same weights: the reduction is in shard order, so the redone
step gives the same sums to the bit. If no CPU is free for the replacement within REPLACE_WAIT
seconds, the run goes on with the actors it has (the batch re-sharded over them: the mean gradient
agrees to ~1e-15), says so once, and takes the replacement back as soon as it starts. Only when no
actor at all can run does the step fail with WorkerCrashed, after which the trainer saves a
resumable checkpoint; so does a step that needed more than MAX_RESTARTS replacements (deaths and
timeouts counted together).

Authentication: since Ray 2.59 `ray start --head` turns on token authentication when the machine
has a token (~/.ray/auth_token, which a private `ray.init()` instance writes on first use), and a
driver that sends none is refused with InvalidAuthToken for 20 s before a bare ConnectionError.
check_auth asks the cluster once, in milliseconds, before ray.init: a refusal is one line naming
the fix; when the cluster is on this machine and RAY_AUTH_MODE is unset, the driver uses this
machine's token itself and says so (Ray does that only for address "auto": it never sends a
token to an address given explicitly, and neither does this code unless the address is ours).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from array import array
from typing import Callable, Optional, Sequence

from . import UserError
from .engine import SerialTimer, StopRequested, Watchdog, WorkerCrashed, batch_messages, eval_ranges, reduce_sums
from .mnist import Split
from .network import parameter_count
from .ray_worker import ShardWorker
from .trace import NoTracer, now, symmetric_offset

CONNECT_TIMEOUT = 30.0  # seconds for a cluster address to answer
REPLACE_WAIT = 10.0  # seconds a dead actor's replacement may take to start before the run shrinks
START_WAIT = 120.0  # seconds the first actors may take to start (a cold node imports the package)
MAX_RESTARTS = 3  # replacements within one step before the run stops (deaths and timeouts alike)
AUTH_PROBE_MS = 5000  # the GCS's answer to check_auth's probe
TOKEN_HELP = ("the cluster's token (`ray get-auth-token` on the head prints it) in ~/.ray/auth_token, "
              "in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH")


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


def check_auth(ray, address: str, warn: Callable[[str], None]) -> None:
    """Fail in one line, within a second, when the cluster at `address` refuses this driver for its
    token (ray.init would log InvalidAuthToken for 20 s, then raise a bare ConnectionError).

    When the cluster requires a token, RAY_AUTH_MODE is unset, this machine has a token and the
    address is this machine's own, token mode is turned on for this process (as Ray does for
    address "auto") and `warn` says so. Ray versions without token authentication skip the check.
    """
    if address == "auto" or "://" in address or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config, InnerGcsClient

        refused_error = ray.exceptions.AuthenticationError
    except (ImportError, AttributeError):
        return  # a Ray without token authentication
    mode = os.environ.get("RAY_AUTH_MODE")
    source = _token_source()

    def has_token() -> bool:
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        try:
            return bool(loader.has_token(ignore_auth_mode=True))
        except refused_error as e:
            raise UserError(f"--ray-address {address}: this machine's Ray token cannot be read "
                            f"({getattr(e, 'message', e)}); put {TOKEN_HELP}") from None

    def refused() -> bool:
        # Ray's own client, without its retries; its C++ log line about the refusal is not shown.
        with _quiet_stderr():
            try:
                InnerGcsClient.standalone(address, None, AUTH_PROBE_MS)
            except refused_error:
                return True
            except Exception:
                return False  # not about the token: ray.init reports it
        return False

    if (mode or "").lower() == "token":
        if not has_token():  # Ray would abort the process (a failed check in C++), not raise
            raise UserError(f"--ray-address {address}: RAY_AUTH_MODE=token, but this machine has no Ray token: put "
                            f"{TOKEN_HELP}")
        if refused():
            raise UserError(f"--ray-address {address}: the Ray cluster refused the token from {source}: "
                            f"put {TOKEN_HELP}")
        return
    if not refused():
        return
    if mode is None and source and has_token() and _on_this_machine(address):
        os.environ["RAY_AUTH_MODE"] = "token"  # what Ray itself does to turn token mode on in-process
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        if refused():
            raise UserError(f"--ray-address {address}: the Ray cluster refused the token from {source}: "
                            f"put {TOKEN_HELP}")
        warn(f"the Ray cluster at {address} requires token authentication: using this machine's token from "
             f"{source} (RAY_AUTH_MODE=token for this run)")
        return
    why = f"RAY_AUTH_MODE is {mode!r}" if mode is not None else (
        f"a token is in {source}; this run sends it only to a cluster on this machine" if source else
        "this machine has no Ray token")
    raise UserError(f"--ray-address {address}: the Ray cluster requires token authentication ({why}): "
                    f"set RAY_AUTH_MODE=token and put {TOKEN_HELP}")


def _token_source() -> Optional[str]:
    """Where Ray reads this driver's token from, in Ray's order; None if nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) else None


def _on_this_machine(address: str) -> bool:
    """Whether `address` (host:port) is a loopback address or one of this machine's own."""
    host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    try:
        ips = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return False
    ours = set()
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    with contextlib.suppress(ValueError):
                        ours.add(ipaddress.ip_address(a.address.split("%")[0]))
    except ImportError:
        pass
    return bool(ips) and all(ip.is_loopback or ip in ours for ip in ips)


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (where Ray's C++ code logs) to the null device for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayEngine:
    """`with RayEngine(...) as engine:` — gradient() and evaluate() run on `workers` Ray actors."""

    def __init__(self, sizes: Sequence[int], train: Split, test: Optional[Split], workers: int,
                 address: Optional[str] = None, warn: Optional[Callable[[str], None]] = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.ray = import_ray()
        self.sizes, self.workers, self.pixels = list(sizes), workers, train.pixels
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        if self.address:
            check_address(self.address)
            check_auth(self.ray, self.address, self.warn)
        self._data: Optional[tuple] = ((train.images, train.labels), ((test.images, test.labels) if test else (b"", b"")))
        self.test_count = test.count if test else 0
        self.size = parameter_count(sizes)
        self.watchdog = Watchdog()  # the trainer's, with its --worker-timeout, once it has one
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

    def _call(self, kind: str, make_calls: Callable[[list], list]) -> list:
        """Run one call per actor (make_calls(actors) -> object refs), replacing actors that die or
        do not answer within the watchdog's limit for `kind`, and redoing the whole call from the
        same weights."""
        ray = self.ray
        for attempt in range(MAX_RESTARTS + 1):
            self._grow()
            if self._params_ref is None:
                with self.serial:
                    self._params_ref = ray.put(self._params)
                    self.bytes_sent += len(self._params) * self.nodes()  # one copy travels to each node
            actors = list(self._actors)
            limit = self.watchdog.limit(kind)
            with self.serial, self.tracer.span("dispatch"):
                sent = now()
                refs = make_calls(actors)
            try:
                with self.tracer.span("wait"):
                    replies, done, late = self._collect(refs, sent + int(limit * 1e9))
                if late:
                    if self.stop_requested():
                        raise StopRequested(f"{len(late)} Ray actor(s) did not answer while stopping")
                    self.restarts += 1
                    if attempt == MAX_RESTARTS:
                        raise WorkerCrashed(f"Ray actors kept failing (the last did not answer within {limit:g} s); "
                                            f"gave up after {MAX_RESTARTS} restarts")
                    self._replace([actors[k] for k in late], f"did not answer within {limit:g} s (killed)")
                    continue
                self.watchdog.answered(kind, (max(done.values(), default=sent) - sent) / 1e9)
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
                self._replace(dead or actors, "died")
        raise AssertionError("unreachable")

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

    def _replace(self, dead: list, what: str) -> None:
        ray = self.ray
        names = ", ".join(f"worker {self._actors.index(a)} @ {self._where[a][1]} (pid {self._where[a][2]})"
                          for a in dead if a in self._actors)
        for actor in dead:
            if actor in self._actors:
                self._actors.remove(actor)
                self._where.pop(actor, None)
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.warn(f"{names} {what}; replacing it and redoing the step")
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

        replies = self._call("grad", calls)
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
