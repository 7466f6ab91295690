"""Plots: a clear message without matplotlib; real PNGs with it (skipped when it is absent)."""

import builtins
import json

import pytest

from parallel_nn import UserError
from parallel_nn.web import plot

METRICS = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "train_accuracy": 0.9, "test_accuracy": 0.89 + e / 100,
            "workers": 2} for e in (1, 2, 3)]


def test_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    with pytest.raises(UserError, match=r"pip install -e '.\[plot\]'"):
        plot.plot_run(str(tmp_path))


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        plot.plot_run(str(tmp_path / "nope"))


def test_curves_and_misclassified_grid_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    out = plot.plot_run(str(tmp_path))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = bytes(range(256)) * (4 * 784 // 256 + 1)
    path, wrong = plot.plot_misclassified(images[: 4 * 784], [1, 2, 3, 4], [1, 5, 3, 0], str(tmp_path / "wrong.png"))
    assert wrong == 2 and path.read_bytes()[:4] == b"\x89PNG"
