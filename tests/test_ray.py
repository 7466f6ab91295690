"""The Ray backend on real multi-node clusters on this machine, every connection on loopback.

One cluster serves the module (a head with 0 CPUs, so actors run only on the worker nodes, plus
3 nodes of 1 CPU each); the elastic test removes a node and adds one back. The token-authentication
test starts its own head with `ray start --head`, as docs/cluster.md tells a user to; the watchdog test
runs a private instance in a fresh interpreter. Each of those two gives its instance its own temp
dir, by which all of its processes, and only them, are found and stopped afterwards. Skipped
where Ray is not installed (it has no PyPy build): `pip install -e '.[ray]'`.
"""

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import psutil
import pytest

from parallel_nn.parallel.ray import actors

actors.loopback_environment()  # before Ray is imported: every process it starts uses 127.0.0.1
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; CPython only)")
from ray.cluster_utils import Cluster  # noqa: E402

from parallel_nn.nn.network import he_init  # noqa: E402
from parallel_nn.nn.optim import Optimizer  # noqa: E402
from parallel_nn.parallel.local.pool import LocalEngine  # noqa: E402
from parallel_nn.parallel.ray.actors import RayEngine  # noqa: E402

SIZES = [784, 32, 32, 10]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "plasma", "dashboard", "runtime_env", "log_monitor", "default_worker")


def ray_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = proc.info["name"] + " " + " ".join(proc.info["cmdline"] or [])
        if any(word in text for word in RAY_PROCESSES):
            pids.add(proc.pid)
    return pids


def non_loopback_connections(pids: set[int]) -> list:
    """TCP endpoints of these processes, listening or connected, that are not loopback addresses."""
    bad = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid not in pids:
            continue
        for addr in (conn.laddr, conn.raddr):
            if addr:
                ip = ipaddress.ip_address(addr.ip)
                ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
                if not ip.is_loopback:
                    bad.append((conn.pid, conn.status, addr.ip, addr.port))
    return bad


@pytest.fixture(scope="module")
def cluster():
    # Fast failure detection, so a removed node is noticed in about a second rather than 30.
    head = {"num_cpus": 0, "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3}}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.worker_nodes_list = [c.add_node(num_cpus=1) for _ in range(3)]
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def trajectory(engine_type, train_set, test_set, workers, steps=5, **kwargs):
    """Momentum steps of 300 examples, then an evaluation: (final params, test loss, predictions)."""
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with engine_type(SIZES, train_set, test_set, workers, **kwargs) as engine:
        engine.set_params(params)
        for step in range(steps):
            grad, _, _ = engine.gradient(range(step * 200, step * 200 + 300))
            params = optimizer.step(params, grad, 0.1, 1 / 300)
            engine.set_params(params)
        loss, predictions = engine.evaluate()
    return params, loss, predictions


def test_the_cluster_talks_over_loopback_only(cluster):
    assert cluster.address.startswith("127.0.0.1:")
    pids = ray_pids()
    assert len(pids) >= 4  # a head and three nodes, at least a raylet each
    assert non_loopback_connections(pids) == []


@pytest.mark.parametrize("workers", [2, 3])
def test_ray_and_local_end_bit_identical(cluster, tiny_splits, workers):
    train_set, test_set = tiny_splits
    on_ray = trajectory(RayEngine, train_set, test_set, workers, address=cluster.address)
    local = trajectory(LocalEngine, train_set, test_set, workers, start_method="spawn")  # no fork after Ray
    assert on_ray == local  # params, test loss and every prediction, to the bit


def test_actors_spread_over_nodes_and_traffic_is_counted(cluster, tiny_splits):
    train_set, test_set = tiny_splits
    with RayEngine(SIZES, train_set, test_set, 3, address=cluster.address) as engine:
        engine.set_params(he_init(SIZES, 0))
        engine.gradient(range(300))
        assert engine.nodes() == 3  # one actor per 1-CPU node
        assert engine.bytes_received == 3 * 8 * len(he_init(SIZES, 0))  # three gradient sums of float64
        assert engine.bytes_sent >= 3 * 8 * len(he_init(SIZES, 0))  # the weights reach each node once
        assert non_loopback_connections(ray_pids()) == []
    ray_after = ray.init(address=cluster.address)  # the run's actors are gone once it has closed
    try:
        deadline = time.monotonic() + 20
        while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 3, ray_after
    finally:
        ray.shutdown()


def test_a_killed_actor_is_replaced_and_the_run_ends_bit_identical(cluster, tiny_splits):
    train_set, test_set = tiny_splits
    expected = trajectory(RayEngine, train_set, test_set, 2, address=cluster.address)
    warnings = []
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with RayEngine(SIZES, train_set, test_set, 2, address=cluster.address, warn=warnings.append) as engine:
        engine.set_params(params)
        for step in range(5):
            if step == 2:  # SIGKILL one actor's process while the step runs
                victim = engine.actors.where[engine.actors.live[1]][2]
                threading.Timer(0.02, os.kill, (victim, signal.SIGKILL)).start()
            grad, _, _ = engine.gradient(range(step * 200, step * 200 + 300))
            params = optimizer.step(params, grad, 0.1, 1 / 300)
            engine.set_params(params)
            if step == 2:
                time.sleep(0.2)
        loss, predictions = engine.evaluate()
        assert engine.restarts >= 1 and "died; replacing it" in warnings[0]
        assert victim not in engine.worker_pids()
    assert (params, loss, predictions) == expected


def test_ctrl_c_checkpoints_and_leaves_no_actor(cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", "--backend", "ray", "--ray-address", cluster.address,
                             "--workers", "2", "--epochs", "50", "--batch-size", "100", "--data-dir", str(tiny_data),
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:  # an epoch is done
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: saved" in out and (run_dir / "checkpoint.json").exists()
    ray.init(address=cluster.address)
    try:
        assert ray.available_resources().get("CPU", 0) == 3  # its actors went with it
    finally:
        ray.shutdown()


def test_bad_addresses_and_a_cluster_without_cpus(tiny_data, tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "--backend", "ray", "--ray-address", "127.0.0.1:9",
                           "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "a")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and "nothing answers there" in done.stderr and done.stderr.count("\n") == 1
    assert time.monotonic() - started < 35 and not (tmp_path / "a").exists()
    empty = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        done = subprocess.run([sys.executable, "-m", "parallel_nn", "--backend", "ray", "--ray-address", empty.address,
                               "--data-dir", str(tiny_data), "--run-dir", str(tmp_path / "b")],
                              capture_output=True, text=True, cwd=ROOT, timeout=90)
        assert done.returncode == 1 and "has no CPU for an actor" in done.stderr, done.stderr
    finally:
        empty.shutdown()


def test_a_private_instance_is_loopback_only_and_leaves_nothing(tiny_data):
    """In a fresh interpreter, as a run starts one (this process is a driver of the test cluster)."""
    script = f"""
import json, os, sys
sys.path.insert(0, "tests")
from test_ray import SIZES, non_loopback_connections, ray_pids
from parallel_nn.data import mnist
from parallel_nn.nn.network import he_init
from parallel_nn.parallel.ray.actors import RayEngine
train_set, test_set = mnist.load({str(tiny_data)!r})
before = ray_pids()
with RayEngine(SIZES, train_set, test_set, 2) as engine:
    engine.set_params(he_init(SIZES, 0))
    engine.gradient(range(300))
    mine = ray_pids() - before
    nice = [os.getpriority(os.PRIO_PROCESS, pid) for pid in engine.worker_pids()]
    print(json.dumps({{"pids": sorted(mine), "bad": non_loopback_connections(mine), "nice": nice}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pids"] and result["bad"] == []
    assert result["nice"] == [os.getpriority(os.PRIO_PROCESS, 0)] * 2  # the actors compute at the trainer's priority, not Ray's 15
    deadline = time.monotonic() + 10
    alive = result["pids"]
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert alive == []  # the instance went with the run


# ---- token authentication (Ray 2.59+: `ray start --head` enables it when the machine has a token) ----

def owned_by(temp: str) -> list:
    """Live processes of the Ray instance whose temp dir is `temp`, and their children: the ones that
    name it in their command line (gcs_server, raylet, ...) or hold a file open under it (Ray's
    Python processes rewrite their command line and environment, but keep their logs open)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:  # this process has head.log open
                continue
            if temp in " ".join(p.info["cmdline"] or []) or any(f.path.startswith(temp + os.sep) for f in p.open_files()):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            pass
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def stop_owned(temp: str, seconds: float = 15.0) -> list[int]:
    """Wait up to `seconds` for the instance's processes to go, then SIGCONT and SIGKILL the rest
    (stopped ones included); the pids that had to be killed."""
    deadline = time.monotonic() + seconds
    while (left := owned_by(temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGCONT)
            p.kill()
    psutil.wait_procs(left, timeout=10)
    return [p.pid for p in left]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def clean_env(**extra) -> dict:
    """This environment without any Ray address or authentication settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")  # loopback, as docs/cluster.md says
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def token_cluster(home):
    """A head with token authentication and 2 CPUs, started by `ray start --head` on 127.0.0.1 with
    its own temp dir and HOME (whose ~/.ray/auth_token is the token); yields (address, temp dir)."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = clean_env(HOME=str(home), RAY_AUTH_MODE="token")
    log = open(os.path.join(temp, "head.log"), "w+")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--include-dashboard=false",
                             "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in open(log.name).read():
            assert head.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", temp
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(20)
        killed = stop_owned(temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert killed == [], f"Ray processes outlived `ray start --block`: {killed}"


def test_a_token_protected_cluster_trains_with_the_token_and_refuses_in_one_line_without(tiny_data, tmp_path):
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    (home / ".ray").mkdir(parents=True)
    stranger.mkdir()
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex + uuid.uuid4().hex)

    def train(run_dir, **env):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "parallel_nn", "--backend", "ray", "--ray-address", address,
                               "--workers", "2", "--epochs", "1", "--data-dir", str(tiny_data), "--run-dir", str(run_dir)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env=clean_env(**env))
        return done, time.monotonic() - started

    with token_cluster(home) as (address, temp):
        pids = {p.pid for p in owned_by(temp)}
        assert len(pids) >= 3 and non_loopback_connections(pids) == []  # gcs_server, raylet, agents, ...
        # The token in ~/.ray/auth_token, RAY_AUTH_MODE unset, a cluster on this machine: used, and said so.
        done, _ = train(tmp_path / "ok", HOME=str(home))
        assert done.returncode == 0, done.stderr
        assert "requires token authentication: using this machine's token from" in done.stderr
        assert (tmp_path / "ok" / "weights.json").exists()
        assert non_loopback_connections({p.pid for p in owned_by(temp)}) == []
        # A wrong token, and none at all: one line each, within seconds, nothing written.
        for name, env, words in [
            ("wrong", dict(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32),
             "refused the token from RAY_AUTH_TOKEN"),
            ("none", dict(HOME=str(stranger)), "requires token authentication (this machine has no Ray token)"),
            ("disabled", dict(HOME=str(home), RAY_AUTH_MODE="disabled"), "(RAY_AUTH_MODE is 'disabled')"),
        ]:
            done, seconds = train(tmp_path / name, **env)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, (name, done.stderr)
            assert words in done.stderr and "RAY_AUTH_TOKEN" in done.stderr, (name, done.stderr)
            assert seconds < 15 and not (tmp_path / name).exists(), (name, seconds)


# ---- the watchdog: an actor that stops answering ----

def test_an_actor_that_stops_answering_is_replaced_and_the_run_ends_bit_identical(tiny_data, tmp_path):
    """SIGSTOP one actor during a step and the other during the evaluation, with a 3 s limit: each
    is killed and replaced, its call redone, and the run ends equal to the uninterrupted one. In a
    fresh interpreter with a private instance in its own temp dir (RAY_TMPDIR)."""
    script = f"""
import json, os, signal, sys
sys.path.insert(0, "tests")
from test_ray import SIZES, non_loopback_connections, ray_pids
from parallel_nn.data import mnist
from parallel_nn.nn.network import he_init
from parallel_nn.nn.optim import Optimizer
from parallel_nn.parallel.base import Watchdog
from parallel_nn.parallel.ray import actors
from parallel_nn.parallel.ray.actors import RayEngine
actors.REPLACE_WAIT = 60.0  # a replacement's start takes ~8 s on a busy 2-core machine: never shrink here
train_set, test_set = mnist.load({str(tiny_data)!r})
warnings = []

def stop(engine, k):
    pid = engine.worker_pids()[k]
    print("stopped", pid, flush=True)
    os.kill(pid, signal.SIGSTOP)
    return pid

def run(engine, stop_step=None, stop_eval=False):
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    engine.set_params(params)
    stopped = []
    for step in range(5):
        if step == stop_step:
            stopped.append(stop(engine, 1))
        grad, _, _ = engine.gradient(range(step * 200, step * 200 + 300))
        params = optimizer.step(params, grad, 0.1, 1 / 300)
        engine.set_params(params)
    if stop_eval:
        stopped.append(stop(engine, 0))
    loss, predictions = engine.evaluate()
    return [params, loss, predictions], stopped

with RayEngine(SIZES, train_set, test_set, 2, warn=warnings.append) as engine:
    engine.watchdog = Watchdog(fixed=3)
    expected, _ = run(engine)
    got, stopped = run(engine, stop_step=2, stop_eval=True)
    result = {{"same": got == expected, "warnings": warnings, "restarts": engine.restarts, "stopped": stopped,
               "pids": engine.worker_pids(), "bad": non_loopback_connections(ray_pids())}}
print(json.dumps(result))
"""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = clean_env(RAY_TMPDIR=temp, HOME=str(tmp_path))  # the instance's token goes to tmp_path/.ray, not ~
    stopped = []
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=150,
                              env=env, start_new_session=True)
        stopped = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("stopped ")]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stopped = [int(line.split()[1]) for line in out.splitlines() if line.startswith("stopped ")]
        raise
    finally:
        left = stop_owned(temp, seconds=10)  # SIGCONT and SIGKILL whatever is left, stopped actors included
        for pid in stopped:
            if not gone(pid):
                left.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same"]  # params, test loss and every prediction, to the bit
    assert result["restarts"] == 2 and len(result["stopped"]) == 2
    assert all("did not answer within 3 s (killed); replacing it" in w for w in result["warnings"]), result["warnings"]
    assert [f"(pid {pid})" in w for w, pid in zip(result["warnings"], result["stopped"])] == [True, True]
    assert not set(result["stopped"]) & set(result["pids"])
    assert result["bad"] == []
    assert left == []  # the stopped actors were killed, and the private instance went with the run


def test_a_lost_node_shrinks_the_run_and_a_new_node_grows_it_back(cluster, tiny_splits, monkeypatch):
    """Runs last: it takes a node away and adds another."""
    monkeypatch.setattr(actors, "REPLACE_WAIT", 3.0)
    train_set, test_set = tiny_splits
    warnings = []
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with RayEngine(SIZES, train_set, test_set, 3, address=cluster.address, warn=warnings.append) as engine:
        engine.set_params(params)
        sizes = []
        for step in range(8):
            if step == 2:
                cluster.remove_node(cluster.worker_nodes_list.pop(), allow_graceful=False)
            if step == 5:
                cluster.worker_nodes_list.append(cluster.add_node(num_cpus=1))
                deadline = time.monotonic() + 30
                while not ray.wait(list(engine.actors._probes), timeout=0)[0] and time.monotonic() < deadline:
                    time.sleep(0.2)
            grad, _, _ = engine.gradient(range(step * 100, step * 100 + 300))
            sizes.append(len(engine.actors.live))
            params = optimizer.step(params, grad, 0.1, 1 / 300)
            engine.set_params(params)
    assert sizes[:2] == [3, 3] and 2 in sizes[2:5] and sizes[-1] == 3, sizes
    assert sum("only 2 of 3 Ray actors" in w for w in warnings) == 1  # said once
    assert any("capacity is back" in w for w in warnings)
    local, _, _ = _local_trajectory(train_set, test_set)
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(params, local))
    assert worst <= 1e-9  # fewer shards, the same mean gradient


def _local_trajectory(train_set, test_set):
    params = he_init(SIZES, 0)
    optimizer = Optimizer("momentum", len(params))
    with LocalEngine(SIZES, train_set, test_set, 3, "spawn") as engine:  # no fork after Ray
        engine.set_params(params)
        for step in range(8):
            grad, _, _ = engine.gradient(range(step * 100, step * 100 + 300))
            params = optimizer.step(params, grad, 0.1, 1 / 300)
            engine.set_params(params)
    return params, None, None
