"""Choosing a backend: the one place that knows them all, a floor above base.py, shards.py and the backends."""

from __future__ import annotations

from typing import Optional, Sequence

from parallel_nn.parallel.base import Engine

BACKENDS = ("local", "ray")


def create_engine(backend: str, sizes: Sequence[int], train, test, workers: int, *, start_method: Optional[str] = None,
                  reduce: str = "parent", address: Optional[str] = None, warn=None) -> Engine:
    """The engine for `backend`; the trainer talks to what this returns without knowing which it is."""
    if backend == "ray":
        from parallel_nn.parallel.ray.actors import RayEngine  # imported only when asked for: Ray is an optional extra

        return RayEngine(sizes, train, test, workers, address=address, warn=warn)
    if backend != "local":
        raise ValueError(f"backend must be one of {BACKENDS}")
    from parallel_nn.parallel.local.pool import LocalEngine

    return LocalEngine(sizes, train, test, workers, start_method, warn=warn, reduce=reduce)
