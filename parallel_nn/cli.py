"""The command line: `python -m parallel_nn [train|evaluate|gradcheck|download|plot|serve] [options]`.

`train` is the default command. Exit codes: 0 success, 2 bad usage, 1 any other failure (one
line; --debug shows the traceback), 130 interrupted (a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import fields
from typing import Optional

import psutil

from parallel_nn import UserError
from parallel_nn.capabilities import START_METHODS
from parallel_nn.nn.optim import DEFAULT_LR, OPTIMIZERS, SCHEDULES
from parallel_nn.parallel.backends import BACKENDS
from parallel_nn.parallel.local.pool import REDUCERS
from parallel_nn.run.progress import silence, write
from parallel_nn.run.rundir import refuse_links, run_files
from parallel_nn.run.train import RUNS_ANYWHERE, memory_problem

COMMANDS = ("train", "evaluate", "gradcheck", "download", "plot", "serve")
DEFAULT_DATA = "datasets/mnist"


def default_workers() -> int:
    return psutil.cpu_count(logical=False) or 1


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def momentum_float(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text} (1 or more makes the velocity grow without bound)")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0: a free one), got {value}")
    return value


def layer_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, e.g. 32,32") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"every hidden layer needs at least 1 unit, got {text!r}")
    return sizes


def _common(p: argparse.ArgumentParser, data: bool = True, data_help: Optional[str] = None) -> None:
    if data:
        p.add_argument("--data-dir", default=DEFAULT_DATA, metavar="DIR",
                       help=(data_help or "where the four MNIST IDX files are") + " (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _engine_flags(p: argparse.ArgumentParser, workers_default) -> None:
    p.add_argument("--workers", type=positive_int, default=workers_default, metavar="N",
                   help="worker processes; 1 still runs through the same engine (default: physical cores, here %d, no more than the batch size)" % default_workers())
    p.add_argument("--start-method", choices=START_METHODS, default=None,
                   help="multiprocessing start method (default: the platform's)")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parallel_nn",
        description="Train a fully connected network on MNIST in pure Python, each mini-batch split "
                    "across worker processes that share the weights through shared memory.",
        epilog="other commands: evaluate FILE, gradcheck, download, plot RUN_DIR, serve [DIR] "
               "(`python -m parallel_nn COMMAND --help`)",
    )
    _engine_flags(p, None)
    _execution_flags(p)
    _training_flags(p)
    _run_flags(p)
    _common(p)
    return p


def _execution_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the workers run: what --resume may change (train.RUNS_ANYWHERE)."""
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="where the workers run: local processes sharing memory, or Ray actors on a cluster "
                        "(needs the extra: pip install -e '.[ray]'; default: %(default)s)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to join, e.g. 10.0.0.5:6379 (only with --backend ray; "
                        "default: $RAY_ADDRESS, else a private local Ray instance sized to --workers)")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write a timeline of the parent and every worker (Chrome trace events: open it in Perfetto "
                        "or chrome://tracing; `plot RUN_DIR` draws it) (default: off)")
    p.add_argument("--worker-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="a worker that does not answer within SECONDS is treated as dead: killed, replaced and the "
                        "step redone (default: 20x the slowest answer so far, at least 60 s)")
    p.add_argument("--trace-steps", type=positive_int, default=30, metavar="N",
                   help="steps traced at the start of each epoch, with --trace; evaluations are always traced (default: %(default)s)")
    p.add_argument("--reduce", choices=REDUCERS, default="parent",
                   help="who sums the workers' gradients: the parent; the workers, in parallel after a barrier; "
                        "or sharded: the workers, who then also apply the update to their own slice of the weights "
                        "(for many cores: the parent's work per step no longer grows with the model). The same "
                        "weights to the bit in every mode (default: %(default)s)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    """What is computed: the model, the optimizer, the data's order and augmentation."""
    p.add_argument("--epochs", type=positive_int, default=None, metavar="E", help="passes over the training set (default: 10)")
    p.add_argument("--batch-size", type=positive_int, default=500, metavar="B", help="global mini-batch, split across the workers (default: %(default)s)")
    p.add_argument("--hidden", type=layer_list, default=[32, 32], metavar="32,32", help="hidden layer sizes (default: 32,32)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="nesterov",
                   help="update rule (default: %(default)s, the best measured; see docs/accuracy.md)")
    p.add_argument("--lr", type=positive_float, default=None, metavar="LR",
                   help="learning rate (default: per optimizer: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="step",
                   help="constant; step: x0.1 from 70%% of the epochs; cosine: to 0 over the run; onecycle: warm up "
                        "from lr/25 to lr over 30%% of the run, then cosine to 0 (default: %(default)s)")
    p.add_argument("--momentum", type=momentum_float, default=0.9, metavar="MU", help="momentum coefficient, in [0, 1) (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, metavar="WD", help="L2 penalty coefficient (default: %(default)s)")
    p.add_argument("--shift", type=int, choices=range(0, 5), default=1, metavar="PIXELS",
                   help="augment: move each training image by up to PIXELS (0-4) in x and y, fresh every epoch (default: %(default)s)")
    p.add_argument("--rotate", type=int, choices=range(0, 31), default=0, metavar="DEGREES",
                   help="augment: also turn each training image by a whole number of degrees in [-DEGREES, DEGREES] "
                        "(0-30), fresh every epoch; the record recipe uses 10 (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="every random choice (init, shuffling) derives from it (default: %(default)s)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Which data, where the run lives, where it starts from."""
    p.add_argument("--limit-train", type=positive_int, default=None, metavar="N", help="use only the first N training examples (default: all 60000)")
    p.add_argument("--limit-test", type=positive_int, default=None, metavar="N", help="use only the first N test examples (default: all 10000)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the file order (default: shuffle every epoch)")
    p.add_argument("--run-dir", default=None, metavar="DIR", help="where metrics, weights and checkpoints go (default: runs/<timestamp>)")
    p.add_argument("--init", default=None, metavar="FILE", help="start from these weights: a weights file or checkpoint (default: fresh He init)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --run-dir (its files are removed first); without it such a directory is refused")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def command_parser(command: str) -> argparse.ArgumentParser:
    prog = f"python -m parallel_nn {command}"
    if command == "evaluate":
        p = argparse.ArgumentParser(prog=prog, description="Test-set loss, accuracy and confusion matrix of a weights file, checkpoint or run directory.")
        p.add_argument("weights", metavar="FILE", help="weights.json, checkpoint.json, or a run directory")
        p.add_argument("--json", action="store_true", help='print {"test_loss", "test_accuracy", "confusion"} as JSON')
        p.add_argument("--limit-test", type=positive_int, default=None, metavar="N", help="use only the first N test examples (default: all)")
        p.add_argument("--misclassified", default=None, metavar="FILE.png", help="also draw the test digits it gets wrong (needs matplotlib)")
        _engine_flags(p, default_workers())
    elif command == "gradcheck":
        p = argparse.ArgumentParser(prog=prog, description="Compare the analytic gradient with central differences on a small network; exit 1 if the relative error is 1e-6 or more.")
        p.add_argument("--seed", type=int, default=0, metavar="S", help="which random small problem (default: %(default)s)")
    elif command == "download":
        p = argparse.ArgumentParser(prog=prog, description="Fetch MNIST and verify its SHA-256 checksums (what `make datasets` runs).")
    elif command == "serve":
        p = serve_parser(prog)
    else:
        p = argparse.ArgumentParser(prog=prog, description="Plot loss and accuracy per epoch of a run to a PNG, and for a run with --trace its timeline "
                                                  "(timeline.png) and where a step goes (steps.png) (needs matplotlib: pip install -e '.[plot]').")
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("--output", default=None, metavar="FILE.png", help="(default: RUN_DIR/curves.png)")
    _common(p, data=command not in ("gradcheck", "plot"),
            data_help="the MNIST test set, for the test digits a run gets wrong" if command == "serve" else None)
    return p


def serve_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Watch runs learn in a browser: a live page of each run's loss and accuracy step by step, its "
                    "first layer's filters, the test digits it gets wrong, its trace, and a pad to draw a digit on "
                    "for the run's latest weights to read. It reads the run directories on every request, so it "
                    "follows a run another process is training (start one with `make train`) and shows past runs. "
                    "Standard library only; see docs/live.md for the JSON API.")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR",
                   help="the folder of run directories, or one run directory (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; any but a loopback one (127.x.x.x, ::1, localhost) makes the page and "
                        "the predict API reachable from the network, with no authentication (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, metavar="PORT",
                   help="port to listen on; 0 takes a free one (the URL printed says which) (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    return p


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    parser = train_parser() if command == "train" else command_parser(command)
    args = parser.parse_args(rest)
    if command == "train":
        if args.resume is None:
            args.workers = args.workers or min(default_workers(), args.batch_size)  # the default fits any batch
            args.epochs = args.epochs or 10
        if args.resume is None and args.workers > args.batch_size:  # on resume: against the saved batch (train.py)
            parser.error(f"--workers {args.workers} is more than --batch-size {args.batch_size}: every worker needs at least one example per step")
        if args.resume is None:
            too_big = memory_problem(args.hidden, args.workers)
            if too_big:
                parser.error(too_big)
        if args.overwrite and args.resume:
            parser.error("--overwrite replaces a run and --resume continues one: choose one")
        if args.run_dir or args.resume:
            try:
                refuse_links(args.resume or args.run_dir)
            except UserError as e:
                parser.error(str(e))
        if not args.resume and not args.overwrite and args.run_dir and run_files(args.run_dir):
            from parallel_nn.run.train import refusal

            parser.error(refusal(args.run_dir))
        if args.ray_address is not None and args.backend != "ray":
            parser.error("--ray-address needs --backend ray")
        if args.backend == "ray" and args.reduce != "parent":
            parser.error(f"--reduce {args.reduce} is a shared-memory reduction of the local backend; on Ray the driver reduces")
        if args.resume:
            refuse_fixed_settings(parser, args, given_flags(parser, rest))
    return command, args


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The settings `argv` names, whatever their values (a value equal to the default included),
    found by parsing it again with no defaults (abbreviated flags are argparse's to resolve)."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def refuse_fixed_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """--resume: a resumed run computes what the saved one would have, so only how it runs may
    change; a setting that fixes what it computes is refused even when given its default value."""
    may_change = {"resume", "epochs", "debug", "overwrite", *RUNS_ANYWHERE}
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    changed = [flags.get(dest, dest) for dest in sorted(given - may_change)]
    if changed:
        allowed = ", ".join(f"--{key.replace('_', '-')}" for key in ("epochs", *RUNS_ANYWHERE))
        parser.error(f"--resume continues with the run's saved settings; {', '.join(changed)} cannot change "
                     f"(allowed: {allowed})")
    args.given = given & set(RUNS_ANYWHERE)  # what was not given keeps the saved run's value (train.SAVED_ON_RESUME)


def run_train(args: argparse.Namespace) -> int:
    from parallel_nn.run.train import Config, Interrupted, train

    known = {f.name for f in fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in known})
    try:
        train(config, resume=args.resume, overwrite=args.overwrite, given=getattr(args, "given", None))
    except Interrupted:
        return 130
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from parallel_nn.run.train import evaluate

    result = evaluate(args.weights, args.data_dir, args.workers, args.start_method, args.limit_test)
    if args.misclassified:
        from parallel_nn.data.mnist import load_split
        from parallel_nn.web.plot import plot_misclassified

        test_set = load_split(args.data_dir, "t10k").limit(args.limit_test)
        path, wrong = plot_misclassified(test_set.images, test_set.labels, result["predictions"], args.misclassified)
        print(f"wrote {path} ({wrong} misclassified)", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({k: result[k] for k in ("test_loss", "test_accuracy", "confusion")}))
        return 0
    print(f"test loss {result['test_loss']:.4f}  accuracy {100 * result['test_accuracy']:.2f}%")
    print("confusion (rows: true digit, columns: predicted)")
    print("      " + "".join(f"{d:>6}" for d in range(10)))
    for d, row in enumerate(result["confusion"]):
        print(f"{d:>6}" + "".join(f"{n:>6}" for n in row))
    return 0


def run_gradcheck(args: argparse.Namespace) -> int:
    from parallel_nn.nn.gradcheck import TOLERANCE, check

    result = check(args.seed)
    verdict = "ok" if result.passed else "FAILED"
    print(f"gradcheck: {result.parameters} parameters, relative error {result.relative_error:.2e} "
          f"(must be < {TOLERANCE:g}): {verdict}")
    return 0 if result.passed else 1


def run_download(args: argparse.Namespace) -> int:
    from parallel_nn.data.mnist import download

    download(args.data_dir)
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from parallel_nn.web.plot import plot_run_all

    for path in plot_run_all(args.run_dir, args.output):
        print(f"wrote {path}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from parallel_nn.web.serve import serve

    return serve(args.dir, args.host, args.port, args.data_dir, args.verbose)


def main(argv: list[str] | None = None) -> int:
    try:
        command, args = parse(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C while the command line is read (on a slow start): nothing has started
        return 130
    handler = {"train": run_train, "evaluate": run_evaluate, "gradcheck": run_gradcheck,
               "download": run_download, "plot": run_plot, "serve": run_serve}[command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        write(sys.stderr, "interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (`... | head -1`): stop quietly, as Unix tools do
        silence(sys.stdout)
        return 1
    except UserError as e:
        if args.debug:
            traceback.print_exc()
            if getattr(e, "details", None):  # a worker's own traceback
                write(sys.stderr, e.details)
        write(sys.stderr, f"error: {e}\n")
        return 1
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where
        if args.debug:
            traceback.print_exc()
        else:
            write(sys.stderr, f"error: {type(e).__name__}: {e} (run again with --debug for the traceback)\n")
        return 1
