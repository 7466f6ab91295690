"""bench/study.py: each variant of the accuracy study reaches the workers. Run in subprocesses, since a variant patches the trainer's modules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def weights(tiny_data, tmp_path, variants, workers=2) -> list[float]:
    run_dir = tmp_path / f"run-{'-'.join(variants) or 'none'}-{workers}"
    command = [sys.executable, "-m", "bench.study", *variants, "--", "--data-dir", str(tiny_data), "--epochs", "2",
               "--batch-size", "100", "--workers", str(workers), "--quiet", "--run-dir", str(run_dir)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    model = json.loads((run_dir / "weights.json").read_text())
    flat = []
    for layer in model["layers"]:
        for key in sorted(layer):
            for row in layer[key]:
                flat.extend(row if isinstance(row, list) else [row])
    return flat


def worst(a, b) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


@pytest.mark.parametrize("variant", ["smooth=0.1", "clean=1", "init-gain=1"])
def test_each_variant_changes_the_run(tiny_data, tmp_path, variant):
    assert worst(weights(tiny_data, tmp_path, [variant]), weights(tiny_data, tmp_path, [])) > 1e-6


def test_an_unknown_variant_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.study", "dropout=0.5", "--", "--epochs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "unknown variant 'dropout=0.5'" in done.stderr
