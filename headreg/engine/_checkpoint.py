"""Run directories and resumable training state: safetensors for tensors, JSON for the rest, no pickle.

A run directory holds

- ``run.json``: the run config and its status (``running``, ``stopped``, ``completed``);
- ``model.safetensors`` + ``config.json``: the model, as :func:`headreg.save_model` writes it;
- ``metrics.jsonl``: one JSON line per finished epoch;
- ``eval.json``: the final evaluation;
- ``resume.safetensors`` + ``resume.json``: everything needed to continue exactly.

Nested state (an optimiser's ``state_dict``, a grad scaler's) is split by :func:`split_state`
into a flat ``{key: tensor}`` dict for safetensors and a JSON tree with placeholders, and put
back together by :func:`join_state`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InvalidValueError

__all__ = [
    "RUN_CONFIG",
    "RUN_FILES",
    "prepare_run_dir",
    "read_run_config",
    "write_json",
    "split_state",
    "join_state",
    "save_resume",
    "load_resume",
    "capture_rng",
    "restore_rng",
]

RUN_CONFIG = "run.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
RESUME_TENSORS = "resume.safetensors"
RESUME_JSON = "resume.json"
#: Files a training run writes; ``--overwrite`` removes exactly these, nothing else.
RUN_FILES = (RUN_CONFIG, "model.safetensors", "config.json", METRICS, EVAL, RESUME_TENSORS, RESUME_JSON)
RESUME_FORMAT = "headreg.resume/1"
_TENSOR = "__tensor__"
_ITEMS = "__items__"
_TUPLE = "__tuple__"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The ``run.json`` of a run directory; CheckpointError when absent or unreadable."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"run directory {run_dir} holds no {RUN_CONFIG}; is it a `headreg train` run?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def prepare_run_dir(
    out: str | Path, config: dict[str, Any], *, overwrite: bool, extra_files: tuple[str, ...] = ()
) -> Path:
    """Create ``out`` for a new run, refusing a directory that already holds something unless ``overwrite``.

    With ``overwrite`` only the files a run writes (:data:`RUN_FILES` and ``extra_files``) are removed;
    a directory holding anything else is still refused, so a mistyped ``--out ~`` deletes nothing.

    Args:
        out: the run directory.
        config: the new run's config, compared with the one already there for the message.
        overwrite: replace a previous run.
        extra_files: further names owned by the caller (``headreg compare`` adds its own).

    Returns:
        The directory, created.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidValueError(f"--out must be a directory, got the file {path}")
    owned = set(RUN_FILES) | set(extra_files)
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if present:
        foreign = [n for n in present if n not in owned and not n.endswith(".tmp")]
        if foreign:
            raise InvalidValueError(
                f"--out {path} is not empty and holds files that are not a headreg run "
                f"({', '.join(foreign[:5])}); choose a new directory"
            )
        if not overwrite:
            raise InvalidValueError(_occupied_message(path, config))
        for name in present:
            target = path / name
            if target.is_file() or target.is_symlink():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _occupied_message(path: Path, config: dict[str, Any]) -> str:
    try:
        old = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if old is None:
        return f"--out {path} already holds a headreg run; pass --overwrite to replace it or choose a new directory"
    old_cfg = old.get("config", old)
    diff = [k for k in sorted(set(old_cfg) | set(config)) if k not in ("out",) and old_cfg.get(k) != config.get(k)]
    status = old.get("status", "unknown")
    if diff:
        shown = "; ".join(f"{k}: {old_cfg.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
        return (
            f"--out {path} already holds a different run (status {status}; {shown}); "
            "pass --overwrite to replace it or choose a new directory"
        )
    hint = f"`headreg train --resume {path}` continues it, " if status != "completed" else ""
    return f"--out {path} already holds this run (status {status}); {hint}--overwrite trains it again"


# ---------------------------------------------------------------------------------------------- nested state
def split_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested structure by a placeholder, collecting it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
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
                raise CheckpointError(f"resume state refers to tensor {key!r}, missing from {RESUME_TENSORS}")
            return tensors[key]
        if _ITEMS in obj:
            return {k: join_state(v, tensors) for k, v in obj[_ITEMS]}
        if _TUPLE in obj:
            return tuple(join_state(v, tensors) for v in obj[_TUPLE])
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


def save_resume(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``resume.safetensors`` then ``resume.json``, each atomically; the step ties the two together."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = split_state(state, tensors, "s")
    step = str(state.get("progress", {}).get("global_step", -1))
    tmp = run_dir / (RESUME_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": RESUME_FORMAT, "global_step": step})
    os.replace(tmp, run_dir / RESUME_TENSORS)
    write_json(run_dir / RESUME_JSON, {"format": RESUME_FORMAT, "global_step": step, "state": tree})


def load_resume(run_dir: Path) -> dict[str, Any]:
    """Read the state :func:`save_resume` wrote; CheckpointError when missing, torn or foreign."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tj, ts = run_dir / RESUME_JSON, run_dir / RESUME_TENSORS
    if not tj.is_file() or not ts.is_file():
        raise CheckpointError(
            f"--resume {run_dir}: no resumable state ({RESUME_JSON} and {RESUME_TENSORS}) in that directory"
        )
    try:
        meta = json.loads(tj.read_text())
        with safe_open(str(ts), framework="pt") as f:
            tmeta = f.metadata() or {}
        tensors = load_file(str(ts), device="cpu")
    except Exception as exc:  # noqa: BLE001 - json / safetensors errors alike mean an unreadable file
        raise CheckpointError(
            f"--resume {run_dir}: resumable state is unreadable ({type(exc).__name__}: {exc})"
        ) from None
    if meta.get("format") != RESUME_FORMAT or tmeta.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"--resume {run_dir}: resume files have format {meta.get('format')!r}, expected {RESUME_FORMAT!r}"
        )
    if meta.get("global_step") != tmeta.get("global_step"):
        raise CheckpointError(
            f"--resume {run_dir}: {RESUME_JSON} (step {meta.get('global_step')}) and {RESUME_TENSORS} "
            f"(step {tmeta.get('global_step')}) disagree; the run was stopped while saving"
        )
    return join_state(meta["state"], tensors)


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
