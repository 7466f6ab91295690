"""Pictures of a run: loss and accuracy per epoch, a grid of the test digits the model gets wrong,
and from a --trace file a timeline of every process and where the average step goes.

matplotlib is an optional extra (`pip install -e '.[plot]'`); training never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from parallel_nn import UserError


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


def plot_run_all(run_dir: str, output: Optional[str] = None) -> list[Path]:
    """The curves, and with a trace (--trace) the timeline and the step breakdown beside them."""
    written = [plot_run(run_dir, output)]
    trace_path = trace_of(run_dir)
    if trace_path:
        written += plot_trace(trace_path, written[0].parent)
    return written


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


# ---- the trace: a timeline of a few steps, and where the average step goes ----

PHASES = {  # span name -> (category for the stacked bar, colour)
    "dispatch": ("messaging", "#f58518"), "write slot": ("messaging", "#f58518"), "serialise": ("messaging", "#f58518"),
    "wait": ("waiting", "#d0d0d0"), "barrier": ("waiting", "#a0a0a0"),
    "read weights": ("compute", "#9ecae9"), "decode": ("compute", "#72b7b2"), "forward": ("compute", "#4c78a8"),
    "backward": ("compute", "#2f4b7c"), "evaluate": ("compute", "#b279a2"),
    "reduce": ("reduce", "#e45756"), "reduce slice": ("reduce", "#e45756"),
    "update": ("update", "#54a24b"), "update slice": ("update", "#54a24b"), "checkpoint": ("update", "#eeca3b"),
    "pack lanes": ("compute", "#88d27a"),
}
CATEGORIES = [("compute", "#4c78a8"), ("messaging", "#f58518"), ("waiting", "#d0d0d0"), ("reduce", "#e45756"),
              ("update", "#54a24b"), ("other", "#f2e6c9")]


def trace_of(run_dir: str) -> Optional[Path]:
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    path = config.get("trace")
    return Path(path) if path and Path(path).exists() else None


def trace_parts(events: list) -> tuple[dict, list, list]:
    """(pid -> name, the X spans, the parent's step spans in time order)."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if e["pid"] == 0 and e["name"] == "step"), key=lambda e: e["ts"])
    return names, spans, steps


def step_breakdown(events: list) -> dict[str, dict[str, float]]:
    """Per process, the mean ms per traced step in each category. A worker's time in a step that no
    span covers is waiting for its next message; the parent's is `other` (progress, bookkeeping)."""
    names, spans, steps = trace_parts(events)
    totals = {pid: dict.fromkeys([c for c, _ in CATEGORIES], 0.0) for pid in names}
    for step in steps:
        lo, hi = step["ts"], step["ts"] + step["dur"]
        for pid in names:
            inside = [e for e in spans if e["pid"] == pid and e["name"] in PHASES and lo <= e["ts"] < hi]
            for e in inside:
                totals[pid][PHASES[e["name"]][0]] += e["dur"] / 1000
            uncovered = max(0.0, step["dur"] - sum(e["dur"] for e in inside)) / 1000
            totals[pid]["waiting" if pid != 0 else "other"] += uncovered
    count = max(1, len(steps))
    return {names[pid]: {c: v / count for c, v in cats.items()} for pid, cats in totals.items()}


def plot_trace(trace_path: Path, output_dir: Path, steps_shown: int = 4) -> list[Path]:
    """timeline.png (a Gantt chart of a few steps, one row per process) and steps.png (a stacked
    bar of where the average traced step goes, per process)."""
    from parallel_nn.parallel import trace as trace_file

    events = trace_file.load(trace_path)
    names, spans, steps = trace_parts(events)
    if not steps:
        raise UserError(f"{trace_path} has no traced steps")
    plt = _pyplot()
    return [_timeline(plt, names, spans, steps, output_dir / "timeline.png", steps_shown),
            _step_bars(plt, events, output_dir / "steps.png")]


def timeline_window(steps: list, steps_shown: int) -> tuple[int, list]:
    """(the last traced epoch, the parent's step spans to show): that epoch's steps after its first
    (an epoch's first step is not a typical one), or the run's first steps if there are no others."""
    last_epoch = max(s["args"]["epoch"] for s in steps)
    window = [s for s in steps if s["args"]["epoch"] == last_epoch][1 : 1 + steps_shown] or steps[:steps_shown]
    return last_epoch, window


def _timeline(plt, names: dict, spans: list, steps: list, timeline: Path, steps_shown: int) -> Path:
    """A Gantt chart of `steps_shown` steps of the last traced epoch, one row per process."""
    last_epoch, window = timeline_window(steps, steps_shown)
    lo, hi = window[0]["ts"], window[-1]["ts"] + window[-1]["dur"]
    rows = sorted(names)
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.8))
    seen = set()
    for row, pid in enumerate(rows):
        for e in spans:
            if e["pid"] != pid or e["name"] not in PHASES or e["ts"] + e["dur"] < lo or e["ts"] > hi:
                continue
            colour = PHASES[e["name"]][1]
            ax.barh(row, e["dur"] / 1000, left=(e["ts"] - lo) / 1000, color=colour, edgecolor="white", linewidth=0.3,
                    label=None if e["name"] in seen else e["name"])
            seen.add(e["name"])
    for s in window:
        ax.axvline((s["ts"] - lo) / 1000, color="black", linewidth=0.5, alpha=0.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([names[p] for p in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{len(window)} training steps of epoch {last_epoch} (vertical lines: step starts)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rows) < 5 else -0.12), ncol=7, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(timeline, dpi=100)
    plt.close(fig)
    return timeline


def _step_bars(plt, events: list, bars: Path) -> Path:
    """A stacked bar per process: where the average traced step goes."""
    breakdown = step_breakdown(events)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(breakdown) + 1.6))
    labels = list(breakdown)
    left = [0.0] * len(labels)
    for category, colour in CATEGORIES:
        values = [breakdown[name][category] for name in labels]
        ax.barh(range(len(labels)), values, left=left, color=colour, label=category)
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_xlim(0, max(left) * 1.02)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean over the traced steps)")
    ax.set_title("where a step goes, per process")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(bars, dpi=100)
    plt.close(fig)
    return bars
