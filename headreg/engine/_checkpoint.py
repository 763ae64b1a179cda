"""Resumable training state as tensors + JSON (no pickle): nested state and random-number-generator states.

Nested state (an optimiser's ``state_dict``, a grad scaler's) is split by :func:`split_state`
into a flat ``{key: tensor}`` dict for safetensors and a JSON tree with placeholders, and put
back together by :func:`join_state`; :func:`capture_rng` / :func:`restore_rng` turn a process's
random states into such a structure and back. :class:`headreg.engine._rundir.RunDir` writes and
reads the result (``resume.json`` + ``resume-<N>.safetensors``).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["STATE_PREFIX", "state_key", "split_state", "join_state", "capture_rng", "restore_rng"]

#: The prefix of every tensor key of the resumable state (``split_state(state, tensors, STATE_PREFIX)``).
STATE_PREFIX = "s"

_TENSOR = "__tensor__"
_ITEMS = "__items__"
_TUPLE = "__tuple__"


# ---------------------------------------------------------------------------------------------- nested state
def state_key(*path: Any) -> str:
    """The key :func:`split_state` gives, under :data:`STATE_PREFIX`, to the tensor at ``path`` of the state
    (``state_key("optimizer", "state", 3, "exp_avg")`` is ``"s.optimizer.state.3.exp_avg"``)."""
    return ".".join([STATE_PREFIX, *map(str, path)])


def split_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested structure by a placeholder, collecting it in ``tensors``.

    A CPU tensor is collected as it is, not copied (a save writes it before anything changes it), so saving
    costs no copy of the model and optimiser state; tensors that share storage are for the writer to part
    (:func:`headreg.models._shards.unshared`).
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[k, split_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a resumable checkpoint (at {prefix})")


def join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            key = obj[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"resume state refers to tensor {key!r}, missing from the resume tensors")
            return tensors[key]
        if _ITEMS in obj:
            return {k: join_state(v, tensors) for k, v in obj[_ITEMS]}
        if _TUPLE in obj:
            return tuple(join_state(v, tensors) for v in obj[_TUPLE])
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """This process's random states: torch (CPU and CUDA), Python's ``random`` and NumPy's global one."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_json(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_json(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_from_json(v) for v in obj)
    return obj
