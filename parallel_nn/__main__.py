"""`python -m parallel_nn ...`: the guard matters, since spawn and forkserver workers import this module."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while the program is still importing: nothing has started
        sys.exit(130)
    sys.exit(main())
