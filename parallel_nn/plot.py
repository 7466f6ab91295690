"""Pictures of a run: loss and accuracy per epoch, and a grid of the test digits the model gets wrong.

matplotlib is an optional extra (`pip install -e '.[plot]'`); training never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from . import UserError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]' (or .venv/bin/pip install matplotlib)") from None
    return plt


def plot_run(run_dir: str, output: Optional[str] = None) -> Path:
    """Write loss and accuracy per epoch of RUN_DIR/metrics.jsonl to a PNG."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; is {run_dir} a run directory with at least one finished epoch?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt line ({e.msg})") from e
    if not metrics:
        raise UserError(f"{path} has no epochs yet")
    plt = _pyplot()
    epochs = [m["epoch"] for m in metrics]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    loss_ax.plot(epochs, [m["test_loss"] for m in metrics], "o-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [100 * m["train_accuracy"] for m in metrics], "o-", label="train")
    acc_ax.plot(epochs, [100 * m["test_accuracy"] for m in metrics], "o-", label="test")
    acc_ax.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(run_dir).resolve().name}: {metrics[-1]['workers']} workers, test accuracy {100 * metrics[-1]['test_accuracy']:.2f}%")
    fig.tight_layout()
    out = Path(output) if output else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_misclassified(images: bytes, labels: Sequence[int], predictions: Sequence[int], output: str,
                       limit: int = 60, side: int = 28) -> tuple[Path, int]:
    """A grid of up to `limit` wrongly classified test digits, titled 'true -> predicted'."""
    plt = _pyplot()
    wrong = [k for k, (y, p) in enumerate(zip(labels, predictions)) if y != p]
    shown = wrong[:limit]
    columns = 10
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, shown):
        pixels = images[k * side * side : (k + 1) * side * side]
        ax.imshow([list(pixels[r * side : (r + 1) * side]) for r in range(side)], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{labels[k]} -> {predictions[k]}", fontsize=9)
    fig.suptitle(f"{len(wrong)} of {len(labels)} test digits misclassified (first {len(shown)}: true -> predicted)")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return Path(output), len(wrong)
