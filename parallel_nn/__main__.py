"""`python -m parallel_nn ...`: the guard matters, since spawn and forkserver workers import this module."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
