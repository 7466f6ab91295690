"""The Ray backend on real multi-node clusters on this machine, every connection on loopback.

One cluster serves the module (a head with 0 CPUs, so actors run only on the worker nodes, plus
3 nodes of 1 CPU each); the elastic test removes a node and adds one back. Skipped where Ray is
not installed (it has no PyPy build): `pip install -e '.[ray]'`.
"""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from parallel_nn import ray_backend

ray_backend.loopback_environment()  # before Ray is imported: every process it starts uses 127.0.0.1
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; CPython only)")
from ray.cluster_utils import Cluster  # noqa: E402

from parallel_nn.local import LocalEngine  # noqa: E402
from parallel_nn.network import he_init  # noqa: E402
from parallel_nn.optim import Optimizer  # noqa: E402
from parallel_nn.ray_backend import RayEngine  # noqa: E402

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
                victim = engine._where[engine._actors[1]][2]
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
import json, sys
sys.path.insert(0, "tests")
from test_ray import SIZES, non_loopback_connections, ray_pids
from parallel_nn import mnist
from parallel_nn.network import he_init
from parallel_nn.ray_backend import RayEngine
train_set, test_set = mnist.load({str(tiny_data)!r})
before = ray_pids()
with RayEngine(SIZES, train_set, test_set, 2) as engine:
    engine.set_params(he_init(SIZES, 0))
    engine.gradient(range(300))
    mine = ray_pids() - before
    print(json.dumps({{"pids": sorted(mine), "bad": non_loopback_connections(mine)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pids"] and result["bad"] == []
    deadline = time.monotonic() + 10
    alive = result["pids"]
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert alive == []  # the instance went with the run


def test_a_lost_node_shrinks_the_run_and_a_new_node_grows_it_back(cluster, tiny_splits, monkeypatch):
    """Runs last: it takes a node away and adds another."""
    monkeypatch.setattr(ray_backend, "REPLACE_WAIT", 3.0)
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
                while not ray.wait(list(engine._probes), timeout=0)[0] and time.monotonic() < deadline:
                    time.sleep(0.2)
            grad, _, _ = engine.gradient(range(step * 100, step * 100 + 300))
            sizes.append(len(engine._actors))
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
