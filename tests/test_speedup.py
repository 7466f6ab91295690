"""bench/speedup.py, the user-facing speed-up benchmark: it runs the real trainer, reads its epochs,
and reports each count against one worker; a trainer that fails is one line, not a table."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_table_has_every_count_against_one_worker(tiny_data, tmp_path):
    table = tmp_path / "speedup.md"
    done = subprocess.run([sys.executable, "-m", "bench.speedup", "--workers", "2", "--rounds", "2", "--epochs", "2",
                           "--plain-steps", "2", "--markdown", str(table), "--", "--data-dir", str(tiny_data),
                           "--batch-size", "100"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("round ") == 2 and done.stderr.count("plain processes 1: 1.00, 2: ") == 2  # a line a round
    rows = {int(m[1]): m for m in re.finditer(r"^\| local \| (\d+) \| ([\d.]+) \(([\d.]+)-([\d.]+)\) \| ([\d.]+) \(", table.read_text(), re.M)}
    assert sorted(rows) == [1, 2]
    assert rows[1][5] == "1.00"  # one worker against itself
    low, median, high = float(rows[2][3]), float(rows[2][2]), float(rows[2][4])
    assert 0 < low <= median <= high
    plain = dict(re.findall(r"^\| local \| (\d+) \|.*\| ([\d.]+) \([\d.]+-[\d.]+\) \|$", table.read_text(), re.M))
    assert plain["1"] == "1.00" and float(plain["2"]) > 0  # what two plain processes gave, each round


@pytest.mark.parametrize("bench,args", [("speedup", a) for a in (
    ["--workers", "abc"], ["--workers", "0"], ["--", "--epochs", "1"], ["--", "--run-dir", "x"], ["--", "--help"],
    ["--backends", "foo"], ["--epochs", "1"], ["--plain-steps", "-1"])] + [("ceiling", a) for a in (
    ["--workers", "x"], ["--workers", "0"], ["--workers", "1,1"], ["--rounds", "0"], ["--steps", "0"])])
def test_bad_flags_are_one_line(bench, args):
    done = subprocess.run([sys.executable, "-m", f"bench.{bench}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{bench}.py: error:")


def test_a_failing_trainer_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.speedup", "--rounds", "1", "--epochs", "2", "--",
                           "--data-dir", str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "bench.speedup: the trainer failed" in done.stderr


def test_ray_rows_give_their_ratio_to_the_local_epoch(tiny_data, tmp_path):
    pytest.importorskip("ray", reason="the Ray extra is not installed")
    table = tmp_path / "speedup.md"
    done = subprocess.run([sys.executable, "-m", "bench.speedup", "--workers", "2", "--rounds", "1", "--epochs", "2",
                           "--plain-steps", "0", "--backends", "local,ray", "--markdown", str(table), "--",
                           "--data-dir", str(tiny_data), "--batch-size", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {(m[1], int(m[2])): float(m[3]) for m in
            re.finditer(r"^\| (local|ray) \| (\d+) \|.*\| ([\d.]+) \([\d.]+-[\d.]+\) \| - \|$", table.read_text(), re.M)}
    assert set(rows) == {("local", 1), ("local", 2), ("ray", 1), ("ray", 2)}
    assert rows["local", 1] == rows["local", 2] == 1.0 and rows["ray", 1] > 0 and rows["ray", 2] > 0


def test_the_step_parts_add_up_to_no_more_than_the_step(tiny_data):
    done = subprocess.run([sys.executable, "-m", "bench.step_parts", "--epochs", "2", "--data-dir", str(tiny_data)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^\| ([a-z ]+) \| ([\d.]+) \| [\d.]+ \|$", done.stdout, re.M)}
    assert list(rows) == ["step", "dispatch", "own shard", "meanwhile", "collect", "reduce", "update", "events"]
    assert rows["own shard"] > 0 and rows["step"] >= rows["own shard"] + rows["update"]
    bad = subprocess.run([sys.executable, "-m", "bench.step_parts", "--workers", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--workers and --epochs must be at least 1" in bad.stderr


def test_the_ceiling_runs_every_count_in_every_round(monkeypatch):
    """bench.ceiling alternates the counts inside each round (a slow spell hits them all), and
    gives each count's step against the first count's, the engine's and the plain processes'."""
    from bench import ceiling, data

    calls = []

    def plain(train, workers, steps):
        calls.append(("plain", workers))
        return [[0.010 / workers] * steps for _ in range(workers)]

    def engine(train, test, workers, steps, reduce):
        calls.append(("engine", workers))
        return [0.012 / workers + 0.001 * (workers > 1)] * steps, 0.5

    monkeypatch.setattr(data, "load", lambda: (None, None, "none"))
    monkeypatch.setattr(ceiling, "ceiling", plain)
    monkeypatch.setattr(ceiling, "engine", engine)
    lines = ceiling.table([1, 2], steps=4, rounds=3)
    assert calls == [("plain", 1), ("engine", 1), ("plain", 2), ("engine", 2)] * 3
    rows = [line.split(" | ") for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0][-2:] == ["1.00 (1.00-1.00)", "1.00 (1.00-1.00) |"]
    assert rows[1][-2:] == ["0.58 (0.58-0.58)", "0.50 (0.50-0.50) |"]  # 7 ms against 12; 5 against 10
    assert rows[1][4] == "0.71 (0.71-0.71)"  # efficiency: 5 ms of plain process against 7 through the engine


def test_the_ceiling_runs_for_real():
    done = subprocess.run([sys.executable, "-m", "bench.ceiling", "--workers", "1,2", "--steps", "3", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| ([12]) \|.*\| ([\d.]+) \([\d.]+-[\d.]+\) \| ([\d.]+) \([\d.]+-[\d.]+\) \|$", done.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][1:] == ("1.00", "1.00")
    assert float(rows[1][1]) > 0 and float(rows[1][2]) > 0
