"""`serve`: the JSON API over real runs, its refusals, the live event stream from a trainer in another
process, stopping on Ctrl-C, and the trainer's per-step progress file. Everything on 127.0.0.1."""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from parallel_nn import mnist, steplog
from parallel_nn.train import Config, evaluate, train
from parallel_nn.serve import loopback, make_server

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_KEYS = {"i", "epoch", "step", "steps", "loss", "accuracy", "examples_per_second", "time"}


def tiny_config(data, run_dir, **overrides) -> Config:
    base = dict(workers=1, epochs=2, batch_size=100, data_dir=str(data), run_dir=str(run_dir), quiet=True)
    base.update(overrides)
    return Config(**base)


class Served:
    """A server on 127.0.0.1, in a thread of this process."""

    def __init__(self, root, data_dir, page_dir):
        self.server = make_server(root, port=0, data_dir=str(data_dir), page_dir=page_dir)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None):
        """(status, headers, the body parsed as JSON when it is JSON)."""
        conn = self.connection()
        try:
            data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
            kind = response.getheader("Content-Type", "")
            return response.status, response, json.loads(raw) if kind == "application/json" else raw
        finally:
            conn.close()

    def get(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def stop(self):
        self.server.stop()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A folder of runs: `done` (2 of 2 epochs, traced), `stopped` (2 of 5), `new` (config only)."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny_config(tiny_data, root / "done", trace=str(root.parent / "done-trace.json")))
    shutil.copytree(root / "done", root / "stopped")
    config = json.loads((root / "stopped" / "config.json").read_text())
    (root / "stopped" / "config.json").write_text(json.dumps({**config, "epochs": 5, "trace": None}))
    (root / "new").mkdir()
    (root / "new" / "config.json").write_text(json.dumps({**config, "epochs": 3, "trace": None}))
    os.utime(root / "new" / "config.json", (time.time() + 5, time.time() + 5))  # the newest
    return root


@pytest.fixture(scope="module")
def relabeled(tiny_data, tmp_path_factory):
    """The tiny test set with every third label moved on by one: digits the model must get wrong."""
    test_set = mnist.load_split(tiny_data, "t10k")
    labels = bytes((y + 1) % 10 if k % 3 == 0 else y for k, y in enumerate(test_set.labels))
    folder = tmp_path_factory.mktemp("relabeled")
    mnist.write_split(folder, "t10k", mnist.Split(test_set.images, labels))
    return folder


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    (folder / "index.html").write_text("<!doctype html><title>placeholder</title>\n")
    (folder / "app.js").write_text("// placeholder\n")
    (folder / "notes.md").write_text("not a served kind\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(runs, tiny_data):
    return evaluate(str(runs / "done"), str(tiny_data), workers=1)["predictions"]


@pytest.fixture(scope="module")
def evaluated_relabeled(runs, relabeled):
    return evaluate(str(runs / "done"), str(relabeled), workers=1)["predictions"]


@pytest.fixture(scope="module")
def served(runs, relabeled, page, evaluated, evaluated_relabeled):
    server = Served(runs, relabeled, page)  # after every evaluation: see the note above
    yield server
    server.stop()


# ---- first, what trains in this process: before the module's server thread starts (a fork with a
# thread running is what Python 3.12 warns about) ----

def test_a_run_writes_one_progress_line_per_step(runs):
    lines = [json.loads(line) for line in (runs / "done" / "progress.jsonl").read_text().splitlines()]
    assert [r["i"] for r in lines] == list(range(24))
    assert all(set(r) == PROGRESS_KEYS for r in lines)
    assert [(r["epoch"], r["step"], r["steps"]) for r in lines] == [(e, s, 12) for e in (1, 2) for s in range(1, 13)]
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 and r["examples_per_second"] > 0 for r in lines)
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[0]["time"] <= lines[-1]["time"] <= time.time()


def test_a_resumed_run_appends_and_first_cuts_what_it_redoes(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, epochs=1))
    inode = (run / "progress.jsonl").stat().st_ino
    train(tiny_config(tiny_data, None, epochs=2), resume=str(run))
    assert (run / "progress.jsonl").stat().st_ino == inode  # appended to
    with open(run / "progress.jsonl", "a") as f:  # what a trainer killed in epoch 3 leaves
        f.write(json.dumps({"i": 24, "epoch": 3, "step": 1, "steps": 12}) + "\n" + '{"i": 25, "epo')
    train(tiny_config(tiny_data, None, epochs=3), resume=str(run))
    lines = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert [r["i"] for r in lines] == list(range(36)) and all(set(r) == PROGRESS_KEYS for r in lines)


class FullDisk:
    """A file whose writes fail with ENOSPC after the first `good` ones."""

    def __init__(self, path, mode, encoding=None, good=3):
        self.file, self.good = open(path, mode, encoding=encoding), good
        self.name = self.file.name

    def write(self, text):
        if self.good == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.good -= 1
        return self.file.write(text)

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def test_a_progress_file_that_cannot_be_written_does_not_stop_training(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steplog, "open", FullDisk, raising=False)
    history = train(tiny_config(tiny_data, tmp_path / "run"))
    assert [m["epoch"] for m in history] == [1, 2]
    assert len((tmp_path / "run" / "progress.jsonl").read_text().splitlines()) == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if "progress.jsonl" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "training goes on" in warnings[0]


def test_real_data_predictions_agree_with_evaluate(real_data, tmp_path, page):
    runs = tmp_path / "runs"
    train(Config(workers=1, epochs=1, limit_train=2000, limit_test=100, data_dir=str(real_data),
                 run_dir=str(runs / "real"), quiet=True))
    predictions = evaluate(str(runs / "real"), str(real_data), workers=1, limit_test=60)["predictions"]
    test_set = mnist.load_split(real_data, "t10k")
    server = Served(runs, real_data, page)
    try:
        for k in range(60):
            answer = server.request("POST", "/api/runs/real/predict",
                                    {"pixels": list(test_set.images[k * 784 : (k + 1) * 784])})[2]
            assert answer["digit"] == predictions[k] and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-9)
    finally:
        server.stop()


# ---- the API ----

def test_runs_lists_each_run_with_its_state_newest_first(served, runs):
    listed = served.get("/api/runs")
    assert [r["name"] for r in listed][0] == "new" and {r["name"] for r in listed} == {"done", "stopped", "new"}
    assert [r["updated"] for r in listed] == sorted((r["updated"] for r in listed), reverse=True)
    by_name = {r["name"]: r for r in listed}
    metrics = [json.loads(line) for line in (runs / "done" / "metrics.jsonl").read_text().splitlines()]
    done = by_name["done"]
    assert done == {"name": "done", "state": "finished", "python": metrics[-1]["python"], "backend": "local", "workers": 1,
                    "epoch": 2, "epochs": 2, "test_accuracy": metrics[-1]["test_accuracy"], "has_trace": True,
                    "updated": done["updated"]}
    assert done["updated"] == pytest.approx((runs / "done" / "metrics.jsonl").stat().st_mtime, abs=5)
    assert (by_name["stopped"]["state"], by_name["stopped"]["epoch"], by_name["stopped"]["epochs"]) == ("stopped", 2, 5)
    assert (by_name["new"]["state"], by_name["new"]["epoch"], by_name["new"]["test_accuracy"]) == ("new", 0, None)
    assert not by_name["stopped"]["has_trace"]


def test_a_single_run_directory_is_served_as_the_one_run(runs, relabeled, page):
    server = Served(runs / "done", relabeled, page)
    try:
        assert [r["name"] for r in server.get("/api/runs")] == ["done"]
        assert len(server.get("/api/runs/done/metrics")) == 2
    finally:
        server.stop()


def test_metrics_are_the_metrics_file(served, runs):
    lines = [json.loads(line) for line in (runs / "done" / "metrics.jsonl").read_text().splitlines()]
    assert served.get("/api/runs/done/metrics") == lines
    assert served.get("/api/runs/new/metrics") == []


def test_steps_since(served, runs):
    every = served.get("/api/runs/done/steps")
    assert [s["i"] for s in every["steps"]] == list(range(24)) and every["next"] == 24  # 1200 / 100 = 12 steps, 2 epochs
    assert every["steps"] == [json.loads(line) for line in (runs / "done" / "progress.jsonl").read_text().splitlines()]
    later = served.get("/api/runs/done/steps?since=20")
    assert [s["i"] for s in later["steps"]] == [20, 21, 22, 23] and later["next"] == 24
    assert served.get("/api/runs/done/steps?since=99") == {"steps": [], "next": 99}
    assert served.get("/api/runs/new/steps") == {"steps": [], "next": 0}
    for bad in ("-1", "x", "1.5"):
        status, _, body = served.request("GET", f"/api/runs/done/steps?since={bad}")
        assert status == 400 and "since" in body["error"]


def test_predictions_agree_with_evaluate(served, tiny_data, evaluated):
    test_set = mnist.load_split(tiny_data, "t10k")
    for k in range(0, 300, 12):
        pixels = list(test_set.images[k * 784 : (k + 1) * 784])
        answer = served.request("POST", "/api/runs/done/predict", {"pixels": pixels})[2]
        probabilities = answer["probabilities"]
        assert answer["digit"] == evaluated[k]
        assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=1e-9)
        assert max(range(10), key=probabilities.__getitem__) == answer["digit"]


def test_filters_are_the_first_layer_scaled_per_unit(served, runs):
    answer = served.get("/api/runs/done/filters")
    weights = json.loads((runs / "done" / "weights.json").read_text())["layers"][0]["W"]
    assert answer["shape"] == [28, 28] and len(answer["filters"]) == 32
    for picture, row in zip(answer["filters"], weights):
        assert len(picture) == 784 and all(isinstance(v, int) and 0 <= v <= 255 for v in picture)
        top = max(map(abs, row))
        assert picture == [128 + round(127 * w / top) for w in row]
        assert 1 in picture or 255 in picture  # the unit's largest weight reaches the end of the scale


def test_misclassified_agrees_with_evaluate(served, relabeled, evaluated_relabeled):
    predictions = evaluated_relabeled
    test_set = mnist.load_split(relabeled, "t10k")
    wrong = [k for k, (y, p) in enumerate(zip(test_set.labels, predictions)) if y != p]
    assert len(wrong) >= 50
    answer = served.get("/api/runs/done/misclassified")
    assert (answer["total"], answer["wrong"]) == (300, len(wrong))
    assert [item["index"] for item in answer["items"]] == wrong[:36]
    for item in answer["items"][:5]:
        k = item["index"]
        assert (item["label"], item["predicted"]) == (test_set.labels[k], predictions[k])
        assert item["pixels"] == list(test_set.images[k * 784 : (k + 1) * 784])
    assert len(served.get("/api/runs/done/misclassified?limit=3")["items"]) == 3
    assert len(served.get("/api/runs/done/misclassified?limit=100000")["items"]) == min(200, len(wrong))


def test_without_the_test_set_misclassified_is_503(runs, page, tmp_path):
    server = Served(runs, tmp_path / "nowhere", page)
    try:
        status, _, body = server.request("GET", "/api/runs/done/misclassified")
        assert status == 503 and "missing" in body["error"] and "\n" not in body["error"]
    finally:
        server.stop()


def test_trace_shows_the_last_traced_epoch(served):
    answer = served.get("/api/runs/done/trace?steps=3")
    assert answer["processes"] == ["parent", "worker 0"] and answer["epoch"] == 2
    assert len(answer["steps"]) == 3 and answer["steps"][0]["start_ms"] == 0
    end = answer["steps"][-1]["start_ms"] + answer["steps"][-1]["duration_ms"]
    assert {s["process"] for s in answer["spans"]} == {"parent", "worker 0"}
    assert {"forward", "backward", "update"} <= {s["name"] for s in answer["spans"]}
    assert all(0 <= s["start_ms"] and s["start_ms"] + s["duration_ms"] <= end + 1e-6 for s in answer["spans"])
    assert [s["step"] for s in answer["steps"]] == [2, 3, 4]  # an epoch's first step is left out, as in plot's timeline
    assert len(served.get("/api/runs/done/trace?steps=1000")["steps"]) == 11  # an epoch of 12 traced steps, less the first
    for run in ("stopped", "new"):
        status, _, body = served.request("GET", f"/api/runs/{run}/trace")
        assert status == 404 and "trace" in body["error"]


def test_a_run_without_weights_has_no_filters_prediction_or_misclassified(served):
    for method, path in (("GET", "filters"), ("GET", "misclassified"), ("POST", "predict")):
        status, _, body = served.request(method, f"/api/runs/new/{path}", {"pixels": [0] * 784})
        assert status == 404 and "no weights yet" in body["error"]


def test_the_page_and_only_its_own_files(served):
    status, response, body = served.request("GET", "/")
    assert status == 200 and b"placeholder" in body and response.getheader("Content-Type").startswith("text/html")
    status, response, _ = served.request("GET", "/static/app.js")
    assert status == 200 and response.getheader("Content-Type").startswith("text/javascript")
    for path in ("/static/notes.md", "/static/missing.css", "/static/", "/static/..", "/static/%2e%2e",
                 "/static/..%2ftest_serve.py", "/static/%2e%2e%2fconfig.json", "/static/a/b.js"):
        status, _, body = served.request("GET", path)
        assert status == 404 and body["error"], path


def test_no_path_reaches_outside_the_runs(served):
    for path in ("/api/runs/../done/metrics", "/api/runs/%2e%2e/metrics", "/api/runs/%2E%2E/done/metrics",
                 "/api/runs/..%2fdone/metrics", "/api/runs/done%2f..%2fdone/metrics", "/api/runs/./metrics",
                 "/api/runs/done/../done/metrics", "/../etc/passwd", "/api/runs/%2fetc/metrics",
                 "/api/runs/nothing/metrics", "/api/runs/done/nothing", "/api/nothing", "/api/runs/done//metrics",
                 "/api/runs//metrics"):
        status, _, body = served.request("GET", path)
        assert status == 404 and isinstance(body, dict) and body["error"], path


def test_wrong_methods_are_405(served):
    for method, path in (("GET", "/api/runs/done/predict"), ("POST", "/api/runs"), ("DELETE", "/api/runs/done/metrics"),
                         ("PUT", "/api/runs/done/predict"), ("POST", "/")):
        status, response, body = served.request(method, path, b"{}" if method != "GET" else None)
        assert status == 405 and body["error"] and response.getheader("Allow"), (method, path)


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    conn = served.connection(timeout=10)
    try:
        conn.putrequest("POST", "/api/runs/done/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10 ** 9))
        conn.endheaders()  # and no body: the answer must come without it
        response = conn.getresponse()
        assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    finally:
        conn.close()


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "object"),
    (b'{"pixel": []}', '"pixels"'),
    (b'{"pixels": "0,0,0"}', '"pixels"'),
    (json.dumps({"pixels": [0] * 783}).encode(), "784 values"),
    (json.dumps({"pixels": [0] * 785}).encode(), "784 values"),
    (json.dumps({"pixels": [0] * 783 + [1.5]}).encode(), "not an integer"),
    (json.dumps({"pixels": [0] * 783 + [True]}).encode(), "not an integer"),
    (json.dumps({"pixels": [0] * 783 + [None]}).encode(), "not an integer"),
    (json.dumps({"pixels": [256] + [0] * 783}).encode(), "out of range"),
    (json.dumps({"pixels": [-1] + [0] * 783}).encode(), "out of range"),
    (b'{"pixels": [NaN]}', '784 values'),
    (b"", "not JSON"),
])
def test_a_bad_predict_request_is_400_with_a_reason(served, body, reason):
    status, _, answer = served.request("POST", "/api/runs/done/predict", body, {"Content-Type": "application/json"})
    assert status == 400 and reason in answer["error"] and "\n" not in answer["error"]


def test_a_request_for_another_host_name_is_refused(served):
    """DNS rebinding: a page elsewhere whose name resolves to 127.0.0.1 must not read the API."""
    status, _, body = served.request("GET", "/api/runs", headers={"Host": f"evil.example:{served.port}"})
    assert status == 403 and "127.0.0.1" in body["error"]
    status, _, _ = served.request("GET", "/api/runs", headers={"Host": f"localhost:{served.port}"})
    assert status == 200


def test_only_loopback_addresses_go_without_a_warning():
    assert all(map(loopback, ("127.0.0.1", "localhost", "LocalHost", "::1", "127.0.0.2")))
    assert not any(map(loopback, ("0.0.0.0", "::", "192.168.1.5", "example.com", "")))


# ---- the event stream ----

def read_event(response, deadline: float) -> tuple[str, str]:
    """The next (event, data) of a stream (comments and retry lines skipped)."""
    event, data = None, None
    while time.monotonic() < deadline:
        line = response.fp.readline().decode()
        if not line:
            raise AssertionError("the stream ended")
        line = line.rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data = line[len("data: "):]
        elif line == "" and event:
            return event, data
    raise AssertionError("no event in time")


def test_the_stream_gives_the_state_then_replays_steps_and_epochs_in_order(served):
    conn = served.connection(timeout=10)
    try:
        conn.request("GET", "/api/runs/done/events?since=10")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        deadline = time.monotonic() + 10
        events = [read_event(response, deadline) for _ in range(17)]
    finally:
        conn.close()
    def key(event, data):
        value = json.loads(data)
        return event, value["i"] if event == "step" else value["epoch"] if event == "epoch" else value["state"]

    assert [key(*e) for e in events] == [("state", "finished"), ("step", 10), ("step", 11), ("epoch", 1)] \
        + [("step", i) for i in range(12, 24)] + [("epoch", 2)]
    conn = served.connection(timeout=10)
    try:  # past the last step: the latest epoch still comes (a client may have read the metrics just before it)
        conn.request("GET", "/api/runs/done/events?since=24")
        response = conn.getresponse()
        events = [read_event(response, time.monotonic() + 10) for _ in range(2)]
    finally:
        conn.close()
    assert [key(*e) for e in events] == [("state", "finished"), ("epoch", 2)]


def test_the_live_stream_follows_a_run_training_in_another_process(tiny_data, relabeled, page, tmp_path):
    root = tmp_path / "runs"
    trainer = subprocess.Popen([sys.executable, "-m", "parallel_nn", "--workers", "1", "--batch-size", "10",
                                "--epochs", "40", "--data-dir", str(tiny_data), "--run-dir", str(root / "live"),
                                "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    server = Served(root, relabeled, page)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r["state"] == "running" for r in server.get("/api/runs")):
            time.sleep(0.1)
        conn = server.connection(timeout=20)
        since = server.get("/api/runs/live/steps")["next"]
        asked = time.time()
        conn.request("GET", f"/api/runs/live/events?since={since}")  # nothing from before: live events only
        response = conn.getresponse()
        assert read_event(response, deadline) == ("state", '{"state": "running"}')
        event, data = read_event(response, deadline)
        if event == "epoch":  # the latest epoch comes first in any case
            event, data = read_event(response, deadline)
        step = json.loads(data)
        assert event == "step" and set(step) == PROGRESS_KEYS and step["i"] >= since and step["time"] >= asked - 1
        trainer.send_signal(signal.SIGINT)
        assert trainer.wait(timeout=30) == 130, trainer.stderr.read()
        deadline = time.monotonic() + 20
        while event != "state":  # the steps it made before it stopped, then the new state
            event, data = read_event(response, deadline)
        assert json.loads(data)["state"] in ("stopped", "new")  # "new": stopped before its first epoch ended
        conn.close()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        server.stop()


def test_a_client_leaving_mid_stream_costs_nothing(served):
    before = set(threading.enumerate())
    conn = served.connection(timeout=10)
    conn.request("GET", "/api/runs/done/events")
    response = conn.getresponse()
    read_event(response, time.monotonic() + 10)
    streams = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert len(streams) == 1
    response.close()
    conn.close()
    streams[0].join(timeout=5)
    assert not streams[0].is_alive()  # the stream's thread saw the client go, and ended
    assert served.get("/api/runs")


# ---- the command ----

def test_serve_prints_its_url_and_stops_on_ctrl_c(runs, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "parallel_nn", "serve", str(runs), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a server that never says where it is fails the test, not hangs it
    watchdog.start()
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"serving (.+) at http://127\.0\.0\.1:(\d+)/ \(Ctrl-C stops\)\n", line)
        assert match and int(match.group(2)) > 0, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(2)), timeout=10)
        conn.request("GET", "/api/runs/done/events")  # a stream open while it stops
        stream = conn.getresponse()
        assert stream.status == 200 and read_event(stream, time.monotonic() + 10)[0] == "state"
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - asked < 3
        assert proc.returncode in (0, 130) and "Traceback" not in err, err
        conn.close()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_refuses_a_port_in_use(runs, served):
    done = subprocess.run([sys.executable, "-m", "parallel_nn", "serve", str(runs), "--port", str(served.port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--port" in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
