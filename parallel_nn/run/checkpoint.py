"""Weights files and checkpoints: JSON, written atomically, validated on the way in.

A weights file is what `--init` and `evaluate` read; a checkpoint adds everything `--resume` needs
to continue bit-for-bit (optimizer state, position in the run, the partial epoch's sums).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from parallel_nn import UserError, atomic
from parallel_nn.data.mnist import CLASSES, PIXELS
from parallel_nn.files import open_regular
from parallel_nn.nn.network import Model, parameter_count, unflatten

WEIGHTS_FORMAT = "parallel_nn.weights/1"
CHECKPOINT_FORMAT = "parallel_nn.checkpoint/1"


def weights_json(model: Model) -> dict[str, Any]:
    layers = [{"W": W, "b": b} for W, b in unflatten(model.params, model.sizes)]
    return {"format": WEIGHTS_FORMAT, "layer_sizes": list(model.sizes), "layers": layers}


def model_from_json(obj: Any, source: str) -> Model:
    """A Model from a weights object, or a UserError naming `source` and what is wrong with it."""
    def bad(what: str) -> UserError:
        return UserError(f"{source}: {what}")

    if not isinstance(obj, dict) or obj.get("format") != WEIGHTS_FORMAT:
        raise bad(f"not a parallel_nn weights file (expected \"format\": \"{WEIGHTS_FORMAT}\")")
    sizes = obj.get("layer_sizes")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(s, int) and s > 0 for s in sizes)):
        raise bad("layer_sizes must be a list of at least two positive integers")
    if sizes[0] != PIXELS or sizes[-1] != CLASSES:
        raise bad(f"layer_sizes {sizes}: a network for MNIST takes {PIXELS} inputs and gives {CLASSES} outputs")
    layers = obj.get("layers")
    if not isinstance(layers, list) or len(layers) != len(sizes) - 1:
        raise bad(f"expected {len(sizes) - 1} layers for layer_sizes {sizes}")
    params: list[float] = []
    for n, (layer, fan_in, fan_out) in enumerate(zip(layers, sizes, sizes[1:])):
        W, b = (layer.get("W"), layer.get("b")) if isinstance(layer, dict) else (None, None)
        if not (isinstance(W, list) and len(W) == fan_out and all(isinstance(r, list) and len(r) == fan_in for r in W)):
            raise bad(f"layer {n}: W must be {fan_out} rows of {fan_in} numbers")
        if not (isinstance(b, list) and len(b) == fan_out):
            raise bad(f"layer {n}: b must have {fan_out} numbers")
        for row in W:
            params.extend(row)
        params.extend(b)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in params):
        raise bad("weights must be finite numbers")
    return Model(list(sizes), [float(v) for v in params])


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        with open_regular(path) as f:  # a FIFO would wait for ever, a device for ever read
            text = f.read().decode()
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from e
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (it holds bytes that are not UTF-8): not a {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}): truncated or corrupt {what}") from e
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a {what}") from None


def load_model(path: str | Path) -> Model:
    """A weights file, a checkpoint, or a run directory (its weights.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights.json"
    obj = read_json(path, "weights file")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("weights")
    return model_from_json(obj, str(path))


def save_model(path: str | Path, model: Model) -> None:
    atomic.write_json(path, weights_json(model))


def save_checkpoint(path: str | Path, model: Model, state: dict[str, Any]) -> None:
    atomic.write_json(path, {"format": CHECKPOINT_FORMAT, "weights": weights_json(model), **state})


def load_checkpoint(path: str | Path) -> tuple[Model, dict[str, Any]]:
    path = Path(path)
    obj = read_json(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a parallel_nn checkpoint (expected \"format\": \"{CHECKPOINT_FORMAT}\")")
    model = model_from_json(obj.get("weights"), str(path))
    for key in ("config", "epoch", "step", "optimizer", "partial"):
        if key not in obj:
            raise UserError(f"{path}: checkpoint lacks {key!r} (corrupt)")
    if len(model.params) != parameter_count(model.sizes):
        raise UserError(f"{path}: weights do not match their layer sizes")
    problem = _position_problem(obj) or _state_problem(obj["optimizer"], len(model.params))
    if problem:
        raise UserError(f"{path}: {problem} (corrupt or edited checkpoint)")
    return model, obj


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large to be a float (an edited 10**400)
        return False


def _position_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's position and running sums, or None."""
    if not isinstance(obj["config"], dict):
        return "config must be an object"
    if not (_count(obj["epoch"]) and _count(obj["step"])):
        return "epoch and step must be whole numbers >= 0"
    partial = obj["partial"]
    if not (isinstance(partial, dict) and _number(partial.get("loss")) and _number(partial.get("seconds"))
            and _count(partial.get("correct")) and _count(partial.get("seen"))):
        return "partial must hold finite loss and seconds, and whole numbers correct and seen"
    if partial["correct"] > partial["seen"] or (partial["seen"] == 0) != (obj["step"] == 0):
        return f"partial: {partial['seen']} examples seen and {partial['correct']} correct cannot follow {obj['step']} steps"
    if not isinstance(obj.get("metrics", []), list):
        return "metrics must be a list"
    digest = obj.get("data_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        return "data_sha256 must be 64 hexadecimal digits"
    return None


def _state_problem(state: Any, size: int) -> str | None:
    """What is wrong with an optimizer state (vectors of `size` finite numbers, finite scalars), or None."""
    if not isinstance(state, dict):
        return "optimizer must be an object"
    for key, value in state.items():
        if isinstance(value, list):
            if len(value) != size or not all(_number(v) for v in value):
                return f"optimizer {key!r} must be {size} finite numbers"
        elif not _number(value):
            return f"optimizer {key!r} must be a finite number"
    return None
