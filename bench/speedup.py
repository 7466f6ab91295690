"""What a user sees: the epoch time of `python -m parallel_nn --workers W`, against one worker.

    python -m bench.speedup [--workers 1,2] [--rounds 5] [--epochs 3] [--backends local,ray] [--markdown FILE]
                            [-- TRAINER FLAGS]

Each round runs the trainer itself once per worker count, with its defaults (batch 500, the
default augmentation and optimizer, the whole MNIST, evaluation included) and whatever flags
follow `--`, and reads `epoch_seconds` from the run's metrics.jsonl. The first epoch is left out
(start-up, and the JIT's warm-up on PyPy); a run's figure is the median of its other epochs.

Shared machines drift (the same epoch can take 50% longer a minute later), so the counts run back
to back within a round, in alternating order, and each round gives its own ratio to the 1-worker
epoch. The table reports the median of the rounds with their range: never the best round.

`--backends local,ray` runs every count on each backend (Ray needs the ray extra, so CPython) and
adds each Ray epoch's ratio to the local epoch with the same workers, from the same round.

What the machine itself gives at that moment is in the last column: after the trainer's runs, each
round times W plain processes at once, nothing shared (`bench.ceiling`'s ceiling: the project's
kernels on 500/W examples a step, `--plain-steps` of them after its warm-up), against one, on
MNIST (or synthetic digits without it). A trainer's ratio can be asked to come close to that one,
not below it; `--plain-steps 0` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench import ceiling, data
from parallel_nn.kernels import interpreter

ROOT = Path(__file__).resolve().parent.parent
OWNED = ("--workers", "--epochs", "--run-dir", "--backend", "--resume", "--quiet", "--help", "-h")  # set per run here


def epoch_seconds(workers: int, epochs: int, extra: list[str]) -> list[float]:
    """The seconds of each epoch after the first, of one run of the trainer with `workers`."""
    with tempfile.TemporaryDirectory(prefix="parallel_nn-speedup-") as tmp:
        command = [sys.executable, "-m", "parallel_nn", "--workers", str(workers), "--epochs", str(epochs),
                   "--run-dir", str(Path(tmp) / "run"), "--quiet", *extra]
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench.speedup: the trainer failed ({' '.join(command[1:])}): "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        metrics = [json.loads(line) for line in open(Path(tmp) / "run" / "metrics.jsonl")]
    return [m["epoch_seconds"] for m in metrics[1:]]



def plain_ratios(counts: list[int], steps: int, train) -> dict[int, float]:
    """{W: the median step of W plain processes at once / one plain process's}, timed now."""
    medians = {w: statistics.median(t for times in ceiling.ceiling(train, w, steps) for t in times) for w in counts}
    return {w: medians[w] / medians[1] for w in counts}


def table(counts: list[int], rounds: int, epochs: int, extra: list[str], backends: list[str],
          plain_steps: int = 0) -> list[str]:
    runs = [(b, w) for b in backends for w in sorted(set([1, *counts]))]
    seconds: dict[tuple, list[float]] = {run: [] for run in runs}
    plain: dict[int, list[float]] = {w: [] for _, w in runs}
    train = None
    for r in range(rounds):
        for b, w in runs if r % 2 == 0 else runs[::-1]:  # alternated: a slow spell hits every run alike
            seconds[b, w].append(statistics.median(epoch_seconds(w, epochs, ["--backend", b, *extra])))
        if plain_steps:
            train = train or data.load()[0]  # after the first trainer ran: a trainer that fails says so at once
            for w, ratio in plain_ratios(sorted(plain), plain_steps, train).items():
                plain[w].append(ratio)
        machine = "; plain processes " + ", ".join(f"{w}: {plain[w][-1]:.2f}" for w in sorted(plain)) if plain_steps else ""
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{b} {w} workers {seconds[b, w][-1]:.2f} s" for b, w in runs)
              + machine, file=sys.stderr, flush=True)
    flags = " ".join(extra) or "the defaults"
    lines = [f"{interpreter()}, {psutil.cpu_count(logical=False)} cores, `python -m parallel_nn` with {flags}, "
             f"{epochs} epochs a run (the first left out), {rounds} rounds", "",
             "| backend | workers | epoch, s: median of the rounds (range) | epoch / 1-worker epoch (range) | speed-up (range) "
             "| epoch / local epoch, same workers (range) | plain processes: step / 1 process's step (range) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for b, w in runs:
        ratios = [a / one for a, one in zip(seconds[b, w], seconds[backends[0], 1])]
        local = [a / l for a, l in zip(seconds[b, w], seconds["local", w])] if "local" in backends else []
        lines.append(f"| {b} | {w} | {data.spread(seconds[b, w])} | {data.spread(ratios)} | {data.spread([1 / x for x in ratios])} "
                     f"| {data.spread(local) if local else '-'} | {data.spread(plain[w]) if plain[w] else '-'} |")
    return lines


def main() -> None:
    data.as_the_trainer_runs("bench.speedup")  # the plain processes with the trainer's settings (PyPy's young generation)
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default=None, help="comma-separated worker counts, each against 1 "
                        "(default: the physical cores here)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each count, alternated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs a run, the first left out (default: %(default)s)")
    parser.add_argument("--backends", default="local", help="comma-separated: local, ray (default: %(default)s)")
    parser.add_argument("--plain-steps", type=int, default=30, help="steps of the plain processes timed after each "
                        "round, for what the machine gives W processes at that moment (always the default model and "
                        "batch on datasets/mnist: the trainer's flags after -- do not reach them); 0: none (default: %(default)s)")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table here")
    args = parser.parse_args(argv)
    owned = [a for a in extra if a.split("=")[0] in OWNED]
    if owned:
        parser.error(f"{owned[0].split('=')[0]} after -- is the benchmark's own to set; give the trainer's other flags there")
    try:
        counts = [int(w) for w in args.workers.split(",")] if args.workers else [psutil.cpu_count(logical=False) or 1]
    except ValueError:
        parser.error(f"--workers {args.workers}: comma-separated whole numbers, e.g. 2 or 2,8")
    if min(counts) < 1:
        parser.error("--workers: each count must be at least 1")
    backends = args.backends.split(",")
    if not set(backends) <= {"local", "ray"} or len(set(backends)) != len(backends):
        parser.error("--backends: local and/or ray, each once")
    if args.epochs < 2 or args.rounds < 1 or args.plain_steps < 0:
        parser.error("--epochs must be at least 2 (the first is left out), --rounds at least 1 and --plain-steps not negative")
    if not data.REAL.joinpath("train-images-idx3-ubyte.gz").exists() and not any(a.split("=")[0] == "--data-dir" for a in extra):
        raise SystemExit("bench.speedup: MNIST is not in datasets/mnist: run `make datasets` first "
                         "(or pass the trainer's --data-dir after --)")
    data.report(table(counts, args.rounds, args.epochs, extra, backends, args.plain_steps), args.markdown)


if __name__ == "__main__":
    main()
