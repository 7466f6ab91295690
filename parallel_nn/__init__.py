"""parallel_nn: a pure-Python MNIST trainer, data-parallel over a multiprocessing pool."""

__version__ = "0.1.0"


class UserError(Exception):
    """A failure the user can fix (missing data, bad file, full disk): shown as one line, exit 1."""
