"""`python -m parallel_nn ...`: the guard matters, since spawn and forkserver workers import this module."""

import os
import platform
import sys

# PyPy sizes its young generation from the L2 cache (1 MB on this project's machines), while one
# training step allocates tens of MB: objects of a step in flight are promoted and then collected
# by major collections, in the parent and in every worker. A larger one makes the step faster on
# PyPy here, and the process tree bigger. 32 MB: 2-worker epochs 6% faster than with 16 MB (5 of
# 5 alternated rounds), and 8 workers within the 1 GB bound since the trainer computes a shard
# itself (one PyPy process fewer: 876 MB; with a ninth process it was 1.1 GB, and the trainer used
# 16 MB). docs/speed.md, "The trainer computes a shard". PyPy reads the setting only when it
# starts, so the trainer sets it and starts again (same pid, same terminal); workers inherit it.
# A value the user set is kept.
NURSERY = "32MB"

if __name__ == "__main__":
    if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
        os.environ["PYPY_GC_NURSERY"] = NURSERY
        os.execv(sys.executable, [sys.executable, "-m", "parallel_nn", *sys.argv[1:]])
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while the program is still importing: nothing has started
        sys.exit(130)
    sys.exit(main())
