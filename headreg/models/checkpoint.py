"""Checkpoints: safetensors weights plus the JSON config that rebuilds the model.

Nothing here unpickles: a checkpoint is tensors and JSON, safe to load from anywhere.
``save_model(model, "run/model.safetensors")`` writes one file with the config in its
metadata; ``save_model(model, "run")`` writes ``run/model.safetensors`` and
``run/config.json``. ``load_model`` takes either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .head_model import HeadModel

__all__ = ["save_model", "load_model", "load_weights", "read_config"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_META_KEY = "headreg_config"
FORMAT = "headreg.model/1"


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / WEIGHTS_NAME


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone so each is its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: HeadModel, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as safetensors weights plus its rebuild config.

    Args:
        model: a :class:`HeadModel` built by :func:`headreg.create_model` from a backbone name.
        path: a ``.safetensors`` file, or a directory (created) for ``model.safetensors`` + ``config.json``.
        metadata: extra JSON-able information stored beside the config (e.g. training metrics).

    Returns:
        The path of the weights file.
    """
    from safetensors.torch import save_file

    from .._version import __version__

    if not isinstance(model, HeadModel):
        raise CheckpointError(f"save_model needs a headreg HeadModel, got {type(model).__name__}")
    if model.config.get("backbone") is None:
        raise CheckpointError(
            "this model was built from an nn.Module backbone, which a JSON config cannot rebuild; "
            "save its state_dict yourself, or build it from a timm/torchvision name"
        )
    config = {"format": FORMAT, "headreg_version": __version__, **model.config, "metadata": metadata or {}}
    try:
        text = json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"the model config is not JSON-serialisable: {exc}") from None
    weights = _weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(_state_dict(model), str(tmp), metadata={_META_KEY: text})
    tmp.replace(weights)  # never leave a half-written checkpoint under the real name
    if weights.name == WEIGHTS_NAME and Path(path).suffix != ".safetensors":
        (weights.parent / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights


def read_config(path: str | Path) -> dict[str, Any]:
    """The config stored with a checkpoint (file or directory)."""
    weights = _weights_path(path)
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint at {weights} (expected a .safetensors file or a run directory)")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    text = meta.get(_META_KEY)
    if text is None and weights.name == WEIGHTS_NAME and (weights.parent / CONFIG_NAME).is_file():
        text = (weights.parent / CONFIG_NAME).read_text()
    if text is None:
        raise CheckpointError(f"{weights} holds no headreg config; was it written by headreg.save_model?")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the config stored in {weights} is not valid JSON: {exc}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{weights} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load checkpoint weights into an existing model, with a clear error when they do not fit."""
    from safetensors.torch import load_file

    weights = _weights_path(path)
    try:
        state = load_file(str(weights), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {weights}") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if mismatched:
            parts.append("shapes differ: " + "; ".join(mismatched[:5]))
        if strict and missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if strict and unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {weights} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)


def load_model(
    path: str | Path,
    *,
    head: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> HeadModel:
    """Rebuild a model from a checkpoint written by :func:`save_model`.

    Args:
        path: the ``.safetensors`` file or the run directory.
        head: if given, the head the caller expects; a checkpoint with another is an error.
        num_classes: if given, the class count the caller expects.
        map_location: device to put the model on.

    Returns:
        The :class:`HeadModel`, in eval mode.
    """
    from .factory import create_model

    config = read_config(path)
    if head is not None and head != config.get("head"):
        raise CheckpointError(f"checkpoint {path} has head {config.get('head')!r}, expected {head!r}")
    if num_classes is not None and num_classes != config.get("num_classes"):
        raise CheckpointError(f"checkpoint {path} has {config.get('num_classes')} classes, expected {num_classes}")
    model = create_model(
        config["backbone"],
        config.get("head"),
        num_classes=config.get("num_classes") or None,
        embedding_dim=config.get("embedding_dim"),
        head_options=config.get("head_options"),
        neck=config.get("neck"),
        neck_dropout=config.get("neck_dropout", 0.0),
        **config.get("backbone_kwargs", {}),
    )
    load_weights(model, path)
    model.config["metadata"] = config.get("metadata", {})
    return model.to(map_location).eval()
