"""Who applies a step's update: the parent (the default), or the workers, each to its own slice.

The run asks its `Update` to `compute` a step (the loss, and the update made ready), checks the
loss, then `commit`s it. Both give the same weights to the bit: the update is element by element,
and a worker updating its slice does the parent's arithmetic on those elements.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from parallel_nn.nn.optim import Optimizer


class ParentUpdate:
    """The design's default: the workers' gradient sums come back, the parent adds them, applies
    the optimizer and writes the new weights where the workers read them."""

    def __init__(self, engine, optimizer: Optimizer, params: Sequence[float]):
        self.engine, self.optimizer, self.params = engine, optimizer, params
        engine.set_params(params)

    def compute(self, batch: Sequence[int], augment: Optional[bytes], lr: float,
                meanwhile: Optional[Callable[[], None]] = None) -> tuple[float, int]:
        grad_sum, loss, correct = self.engine.gradient(batch, augment, meanwhile=meanwhile)
        self.ready = (grad_sum, lr, 1.0 / len(batch))  # shard sums -> the batch mean gradient
        return loss, correct

    def commit(self) -> None:
        grad_sum, lr, scale = self.ready
        with self.engine.serial, self.engine.tracer.span("update"):
            self.params = self.optimizer.step(self.params, grad_sum, lr, scale)
            self.engine.set_params(self.params)

    def weights(self) -> Sequence[float]:
        return self.params

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()


class WorkersUpdate:
    """--reduce sharded: after the reduce-scatter each worker applies the update to its own slice
    of the weights and of the optimizer's state, both in shared memory and double-buffered. The
    parent sends the step and reads back the loss: none of its work grows with the model."""

    def __init__(self, engine, optimizer: Optimizer, params: Sequence[float]):
        self.engine, self.name, self.t = engine, optimizer.name, optimizer.state["t"]
        self.settings = (optimizer.name, optimizer.momentum, optimizer.weight_decay)
        engine.set_params(params)
        engine.set_state(self.name, optimizer.state_dict())

    def compute(self, batch: Sequence[int], augment: Optional[bytes], lr: float,
                meanwhile: Optional[Callable[[], None]] = None) -> tuple[float, int]:
        return self.engine.step(batch, augment, lr, 1.0 / len(batch), self.t, self.settings, meanwhile=meanwhile)

    def commit(self) -> None:
        with self.engine.serial:
            self.engine.commit()
            self.t += 1

    def weights(self) -> Sequence[float]:
        return self.engine.weights()

    def state_dict(self) -> dict:
        return {"t": self.t, **self.engine.state(self.name)}


def make_update(reduce: str, engine, optimizer: Optimizer, params: Sequence[float]):
    return (WorkersUpdate if reduce == "sharded" else ParentUpdate)(engine, optimizer, params)
