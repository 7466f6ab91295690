"""`python -m parallel_nn ...`: the guard matters, since spawn and forkserver workers import this module."""

import os
import platform
import sys

# PyPy sizes its young generation from the L2 cache (1 MB on this project's machines), while one
# training step allocates tens of MB: objects of a step in flight are promoted and then collected
# by major collections, in the parent and in every worker. A larger one makes the step faster on
# PyPy here, and the process tree bigger: 16 MB keeps the memory of 1 MB (32 MB, 5% faster still,
# added ~300 MB at 2 workers and took 8 workers past the 1 GB bound; docs/speed.md, "Engine
# efficiency").
NURSERY = "16MB"

# PyPy before 7.3.16 (Debian 12 ships 7.3.11) has a bug in its incremental garbage collector: a
# list copied while a major collection is marking can lose track of what it holds, and the
# process dies of a segmentation fault, now and then, mostly in pytest's rewriting of a test
# file's asserts (PyPy's fix: 7.3.16, "Fixing a Bug in PyPy's Incremental GC", 2024). Marking in
# one step, as this setting makes it, never leaves a collection half-way while the program runs.
# It costs the trainer nothing measurable here (docs/speed.md, "A crash of PyPy's collector").
ONE_STEP_MARKING = "64GB"
FIXED_COLLECTOR = (7, 3, 16)


def pypy_settings(implementation: str = platform.python_implementation(),
                  version: tuple = tuple(getattr(sys, "pypy_version_info", ())[:3])) -> dict[str, str]:
    """The environment PyPy is run with here: PyPy reads it only when it starts."""
    if implementation != "PyPy":
        return {}
    settings = {"PYPY_GC_NURSERY": NURSERY}
    if version < FIXED_COLLECTOR:
        settings["PYPY_GC_INCREMENT_STEP"] = ONE_STEP_MARKING
    return settings


def interpreter_options() -> list[str]:
    """The options this interpreter was started with that a new start must repeat (-W, -X, -O,
    -B, -s, -E, -b: `python -X faulthandler -m parallel_nn` keeps its faulthandler)."""
    flags = sys.flags
    options = [f"-W{w}" for w in sys.warnoptions]
    options += [f"-X{k}" if v is True else f"-X{k}={v}" for k, v in getattr(sys, "_xoptions", {}).items()]
    options += ["-O"] * flags.optimize + ["-b"] * flags.bytes_warning
    options += [flag for flag, on in (("-B", flags.dont_write_bytecode), ("-s", flags.no_user_site),
                                      ("-E", flags.ignore_environment)) if on]
    return options


def start_with_pypy_settings(module: str) -> None:
    """Start `python -m module` again, same pid and terminal, with what `pypy_settings` adds to the
    environment, unless it is there already; a value the user set is kept. Workers inherit it.
    PyPy reads its arguments as UTF-8 (undecodable bytes escaped) whatever the locale, so they are
    handed back the same way: in a C locale, str arguments would not encode."""
    missing = {name: value for name, value in pypy_settings().items() if name not in os.environ}
    if missing:
        os.environ.update(missing)
        argv = [sys.executable, *interpreter_options(), "-m", module, *sys.argv[1:]]
        os.execv(os.fsencode(sys.executable), [a.encode("utf-8", "surrogateescape") for a in argv])


if __name__ == "__main__":
    start_with_pypy_settings("parallel_nn")
    try:
        from parallel_nn.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the program is still importing: nothing has started
        sys.exit(130)
    sys.exit(main())
