"""`python -m parallel_nn ...`: the guard matters, since spawn and forkserver workers import this module."""

import os
import platform
import sys

# PyPy sizes its young generation from the L2 cache (1 MB on this project's machines), while one
# training step allocates tens of MB: objects of a step in flight are promoted and then collected
# by major collections, in the parent and in every worker. A larger one makes the step faster on
# PyPy here, and the process tree bigger: 16 MB keeps the memory of 1 MB (32 MB, 5% faster still,
# added ~300 MB at 2 workers and took 8 workers past the 1 GB bound; docs/speed.md, "Engine
# efficiency"). PyPy reads the setting only when it starts, so the trainer sets it and starts
# again (same pid, same terminal); workers inherit it. A value the user set is kept.
NURSERY = "16MB"

if __name__ == "__main__":
    if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
        os.environ["PYPY_GC_NURSERY"] = NURSERY
        os.execv(sys.executable, [sys.executable, "-m", "parallel_nn", *sys.argv[1:]])
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while the program is still importing: nothing has started
        sys.exit(130)
    sys.exit(main())
