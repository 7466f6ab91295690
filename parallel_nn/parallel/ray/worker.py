"""A Ray actor of the Ray backend (actors.py): one per worker, holding the dataset bytes.

It runs shards.shard_gradient and shards.shard_predictions, the functions a local worker process
(local/worker.py) runs, and returns the gradient sum as float64 bytes. Ray is imported only inside the
actor's methods: this module is shipped to the cluster with the package and imported there.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Sequence

from parallel_nn.kernels import floats
from parallel_nn.parallel.shards import shard_gradient, shard_predictions, unpack_indices
from parallel_nn.parallel.trace import Recorder, now


class ShardWorker:
    """One actor: holds the dataset bytes, computes shard gradients and predictions on request."""

    def __init__(self, sizes: Sequence[int], pixels: int, train: tuple[bytes, bytes], test: tuple[bytes, bytes]):
        self.sizes, self.pixels = list(sizes), pixels
        (self.train_images, self.train_labels), (self.test_images, self.test_labels) = train, test

    def where(self) -> tuple[str, str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid()

    def gradient(self, params: bytes, packed: bytes, augment: Optional[bytes], trace: bool = False) -> tuple:
        """(gradient sum as float64 bytes, loss, correct, spans, (start, end) of this call on our clock)."""
        rec, start = Recorder(trace), now()
        with rec.span("read weights"):
            weights = floats(params)
        flat, loss, correct = shard_gradient(weights, self.sizes, self.train_images, self.train_labels,
                                             unpack_indices(packed), self.pixels, augment, rec)
        with rec.span("serialise"):
            out = flat.tobytes()
        return out, loss, correct, rec.spans, (start, now())

    def predict(self, params: bytes, start: int, stop: int, trace: bool = False) -> tuple:
        rec, began = Recorder(trace), now()
        with rec.span("evaluate"):
            loss, predictions = shard_predictions(floats(params), self.sizes, self.test_images, self.test_labels,
                                                  start, stop, self.pixels)
        return loss, predictions, rec.spans, (began, now())
