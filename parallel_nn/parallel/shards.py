"""What every backend computes the same way: the batch cut into shards, a shard's gradient sum,
and the shard sums added in shard order.

Both backends (local/pool.py, ray/actors.py) shard the batch with `shard`, have every worker run
`shard_gradient`, and add the shard sums with `reduce_sums` in shard order, so the same `--workers`
gives bit-identical weights on either backend.
"""

from __future__ import annotations

from array import array
from typing import Optional, Sequence

from parallel_nn.data.mnist import AUGMENT_BYTES, decode_batch
from parallel_nn.kernels import KIND, add_into, doubles, floats
from parallel_nn.nn.network import backward, forward, predict, unflatten
from parallel_nn.parallel.trace import Recorder

EVAL_CHUNK = 1000  # test images a worker decodes at a time: bounds its memory


def shard(indices: Sequence[int], workers: int) -> list[list[int]]:
    """Contiguous pieces whose sizes differ by at most one (500 over 8: four of 63, four of 62)."""
    n, extra = divmod(len(indices), workers)
    pieces, start = [], 0
    for k in range(workers):
        size = n + (k < extra)
        pieces.append(list(indices[start : start + size]))
        start += size
    return pieces


def reduce_sums(parts: Sequence) -> Sequence[float]:
    """total[p] = sum_k parts[k][p], adding the float64 buffers `parts` in the order given.

    Every reduction of shard sums goes through here (the local parent, the local workers' reduce-
    scatter, the Ray driver), so all of them add in the same order and agree to the bit. On
    CPython one C-level pass (zip walks the parts side by side); under the JIT a plain loop.
    """
    if not parts:
        return []
    if KIND == "loops":
        total = floats(parts[0])  # a fresh copy, summed into in place
        for part in parts[1:]:
            add_into(total, floats(part))
        return total
    return list(map(sum, zip(*map(doubles, parts))))


def shard_gradient(params: Sequence[float], sizes: Sequence[int], images, labels, indices: Sequence[int],
                   pixels: int, augment: Optional[bytes] = None, rec: Optional[Recorder] = None,
                   packed=None) -> tuple[array, float, int]:
    """The worker's computation: (flat sum of the shard's per-example gradients, summed loss, correct).

    `images` and `labels` are the raw training bytes (or views of them); nothing else is needed,
    which is what lets a local process and a remote actor run the same function. `rec` records
    the decode, forward and backward spans for --trace. `packed`: the first layer's lanes, packed
    by the workers together (local/worker.py's Participant.share_lanes), or None to pack them here.
    """
    rec = rec or Recorder(False)
    flat = array("d")
    if not indices:  # an empty shard contributes zeros (and still takes part in a reduction)
        flat.frombytes(bytes(8 * len(params)))
        return flat, 0.0, 0
    layers = unflatten(params, sizes)
    with rec.span("decode"):
        X = decode_batch(images, indices, pixels, augment)
        X.rows  # decoded here, not lazily inside the forward pass
    with rec.span("forward"):
        Zs, As = forward(layers, X, packed)
    with rec.span("backward"):
        grads, loss, correct = backward(layers, Zs, As, [labels[k] for k in indices])
        for dW, db in grads:
            for row in dW:
                flat.extend(row)
            flat.extend(db)
    return flat, loss, correct


def shard_predictions(params: Sequence[float], sizes: Sequence[int], images, labels, start: int, stop: int,
                      pixels: int) -> tuple[float, list[int]]:
    """(summed loss, predicted classes) of test examples start..stop-1, a chunk at a time."""
    layers = unflatten(params, sizes)
    loss, predictions = 0.0, []
    for a in range(start, stop, EVAL_CHUNK):
        chunk = range(a, min(stop, a + EVAL_CHUNK))
        part_loss, part = predict(layers, decode_batch(images, chunk, pixels), [labels[k] for k in chunk])
        loss += part_loss
        predictions.extend(part)
    return loss, predictions


def pack_indices(indices: Sequence[int]) -> bytes:
    """Example indices as int32 bytes: what travels to a worker each step (pickling a list of ints
    costs ~0.25 ms a message on PyPy; bytes pickle as one copy)."""
    return array("i", indices).tobytes()


def unpack_indices(data: bytes) -> list[int]:
    values = array("i")
    values.frombytes(data)
    return values.tolist()


def batch_messages(indices: Sequence[int], augment: Optional[bytes], workers: int, everyone: bool = False) -> list:
    """Per worker: (its packed indices, its augmentation bytes) or None when it has nothing
    to do (`everyone`: every worker gets a message, empty shards included)."""
    messages, start, a = [], 0, AUGMENT_BYTES
    for piece in shard(indices, workers):
        part = None if augment is None else augment[a * start : a * (start + len(piece))]
        messages.append((pack_indices(piece), part) if piece or everyone else None)
        start += len(piece)
    return messages


def eval_ranges(count: int, workers: int) -> list:
    """Per worker: (start, stop) of its test examples, or None."""
    return [(p[0], p[-1] + 1) if p else None for p in shard(range(count), workers)]
