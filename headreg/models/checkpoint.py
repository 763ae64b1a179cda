"""Checkpoints: safetensors weights plus the JSON config that rebuilds the model.

Nothing here unpickles: a checkpoint is tensors and JSON, safe to load from anywhere.
``save_model(model, "run/model.safetensors")`` writes one file with the config in its
metadata; ``save_model(model, "run")`` writes ``run/model.safetensors`` and
``run/config.json``. ``load_model`` takes either.

A checkpoint is untrusted input: its config is validated against :data:`headreg._schema.MODEL_CONFIG`
and its backbone arguments against an allow-list before anything is built, so a crafted config cannot
make headreg open another file or reach the network. ``save_model`` records two SHA-256 digests in the
config: ``weights_sha256`` over the tensors (names, dtypes, shapes and bytes, so it can live in the
file's own header) and ``config_sha256`` over the keys that rebuild the model; ``load_model`` checks
both (``verify=False`` skips it), so a flipped byte or a head edited into ``config.json`` is a
"checksum mismatch", not a model that silently computes garbage. See docs/reliability.md.

A model with a class-sharded head (``shard_head=True``) is saved by every rank at once, one file per rank
and an index (``model.safetensors.index.json``, :mod:`headreg.models._shards`) beside ``config.json``; the
index records each file's digest. ``load_model`` reads either layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_output, atomic_write_text
from .._schema import MODEL_CONFIG, validate
from .._schema_backbone import check_backbone_kwargs
from ..errors import CheckpointError
from ..heads._sharded import ShardedHead
from ._digest import UnverifiedCheckpointWarning, tensors_sha256, verify_tensors
from ._shards import INDEX_NAME, SHARD_FILE, ShardSet, logical_state, write_shards
from ._shards_read import fill_model
from .head_model import HeadModel

__all__ = [
    "save_model",
    "load_model",
    "load_weights",
    "read_config",
    "tensors_sha256",
    "verify_tensors",
    "check_run_weights",
    "UnverifiedCheckpointWarning",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_META_KEY = "headreg_config"
FORMAT = "headreg.model/1"
#: The config keys that rebuild the model; ``config_sha256`` covers exactly these.
_REBUILD_KEYS = ("backbone", "backbone_kwargs", "head", "head_options", "num_classes", "embedding_dim", "neck",
                 "neck_dropout")  # fmt: skip


def _config_sha256(config: Mapping[str, Any]) -> str:
    rebuild = {k: config.get(k) for k in _REBUILD_KEYS}
    return hashlib.sha256(json.dumps(rebuild, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / WEIGHTS_NAME


def _shards_dir(path: str | Path) -> Path | None:
    """The directory of a sharded checkpoint at ``path`` (the directory or its index file), else None."""
    p = Path(path)
    if p.name == INDEX_NAME:
        return p.parent
    return p if p.suffix != ".safetensors" and (p / INDEX_NAME).is_file() else None


def _read_index(directory: Path) -> ShardSet:
    index = directory / INDEX_NAME
    try:
        obj = json.loads(index.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {index}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is not valid JSON: {exc}") from None
    return ShardSet.from_json(obj, str(index))


def _state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone so each is its own.
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_model(
    model: HeadModel,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as safetensors weights plus its rebuild config.

    A model whose head is class-sharded (``shard_head=True`` under a process group) is saved by every rank
    at once (a collective: call it on all of them): each writes its rows, ``model-<N>-<r>-of-<W>.safetensors``,
    and rank 0 the replicated weights, ``config.json`` and ``model.safetensors.index.json``. No rank holds
    more than its own shard; :func:`load_model` on one process rebuilds the whole model.

    Args:
        model: a :class:`HeadModel` built by :func:`headreg.create_model` from a backbone name.
        path: a ``.safetensors`` file, or a directory (created) for ``model.safetensors`` + ``config.json``
            (a directory only, for a sharded head).
        metadata: extra JSON-able information stored beside the config (e.g. training metrics).
        state: the weights to write instead of ``model.state_dict()`` (the logical tensors of a sharded
            head, when the caller has them whole: then one file).

    Returns:
        The path of the weights file (of the index, for a sharded head).
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
        # The digest of the config as a reader will see it (tuples read back as lists).
        config["config_sha256"] = _config_sha256(json.loads(json.dumps(config)))
    except TypeError as exc:
        raise CheckpointError(f"the model config is not JSON-serialisable: {exc}") from None
    if state is None and isinstance(model.head, ShardedHead):
        return _save_shards(model, Path(path), config)
    state = _state_dict(model if state is None else state)
    config["weights_sha256"] = tensors_sha256(state)
    text = json.dumps(config, sort_keys=True)
    weights = _weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(weights) as tmp:  # never a half-written checkpoint under the real name, even after a kill
        save_file(state, str(tmp), metadata={_META_KEY: text})
    if weights.name == WEIGHTS_NAME and Path(path).suffix != ".safetensors":
        atomic_write_text(weights.parent / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        _remove_shards(weights.parent)  # a sharded checkpoint this one replaces
    return weights


def _save_shards(model: HeadModel, directory: Path, config: dict[str, Any]) -> Path:
    """A sharded head's checkpoint: every rank's file, then ``config.json`` and the index on rank 0."""
    if directory.suffix == ".safetensors":
        raise CheckpointError(
            f"a class-sharded model is saved as a directory (one file per rank and an index), not {directory}"
        )
    tensors, split = logical_state(model)
    assert split is not None

    def commit(shards: ShardSet) -> None:
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(directory / INDEX_NAME, json.dumps(shards.to_json(), indent=2) + "\n")  # the commit
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)  # a one-file checkpoint this one replaces

    write_shards(directory, "model", tensors, split, commit)
    return directory / INDEX_NAME


def _remove_shards(directory: Path) -> None:
    """Remove a sharded model checkpoint's index and files from ``directory``."""
    (directory / INDEX_NAME).unlink(missing_ok=True)
    for p in directory.glob("model-*-of-*.safetensors"):
        m = SHARD_FILE.match(p.name)
        if m and m.group(1) == "model":
            p.unlink(missing_ok=True)


def read_config(path: str | Path) -> dict[str, Any]:
    """The config stored with a checkpoint (file or directory), validated against its schema.

    Raises:
        CheckpointError: no checkpoint, not JSON, another format, a key that is unknown, of the wrong type or
            out of range, or a backbone argument a file may not carry (``checkpoint_path``, ``pretrained``...).
    """
    weights = _weights_path(path)
    sharded = _shards_dir(path)
    if sharded is not None:
        weights, meta = sharded / INDEX_NAME, {}  # the config is config.json's
    elif not weights.is_file():
        raise CheckpointError(f"no checkpoint at {weights} (expected a .safetensors file or a run directory)")
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None
    text, where = meta.get(_META_KEY), f"the config stored in {weights}"
    if text is None and weights.name in (WEIGHTS_NAME, INDEX_NAME) and (weights.parent / CONFIG_NAME).is_file():
        where = str(weights.parent / CONFIG_NAME)
        try:
            text = (weights.parent / CONFIG_NAME).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{where} is unreadable: {exc}") from None
    if text is None:
        raise CheckpointError(f"{weights} holds no headreg config; was it written by headreg.save_model?")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{weights} has format {found!r}, expected {FORMAT!r}")
    validate(config, MODEL_CONFIG, where=where)
    check_backbone_kwargs(config.get("backbone_kwargs", {}), where=where)
    return config


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {weights}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _fit(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, strict: bool) -> None:
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


def _verify(config: dict[str, Any], state: dict[str, torch.Tensor] | None, weights: Path, verify: bool) -> None:
    """Check the tensors and the rebuild config against the digests ``save_model`` recorded.

    ``state`` None: a sharded checkpoint, whose files are checked against the index's digests as they are read.
    """
    if not verify:
        return
    recorded = config.get("config_sha256")
    if recorded is not None and recorded != _config_sha256(config):
        raise CheckpointError(
            f"{weights}: checksum mismatch: the config (backbone {config.get('backbone')!r}, head "
            f"{config.get('head')!r}, ...) is not the one the weights were saved with; was config.json edited? "
            "(--no-verify / verify=False loads it anyway)"
        )
    if state is not None:
        verify_tensors(state, config.get("weights_sha256"), where=str(weights))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, *, verify: bool = True) -> None:
    """Load checkpoint weights into an existing model, with a clear error when they do not fit.

    Args:
        model: the model to fill.
        path: the ``.safetensors`` file or the run directory.
        strict: every tensor of the model must be in the checkpoint and none other (always, for a sharded
            checkpoint).
        verify: check the tensors against the digests recorded in the checkpoint's headreg config (a plain
            safetensors file without one loads unchecked).
    """
    sharded = _shards_dir(path)
    if sharded is not None:  # every tensor of the model, file by file (strict)
        fill_model(model, sharded, _read_index(sharded), verify=verify, where=str(sharded / INDEX_NAME))
        return
    weights = _weights_path(path)
    state = _read_tensors(weights)
    if verify:
        try:
            config = read_config(path)
        except CheckpointError:  # weights without a headreg config: nothing recorded to check against
            config = None
        if config is not None:
            _verify(config, state, weights, verify)
    _fit(model, state, weights, strict)


def load_model(
    path: str | Path,
    *,
    head: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> HeadModel:
    """Rebuild a model from a checkpoint written by :func:`save_model`.

    The config is validated first (schema and backbone allow-list, see :func:`read_config`); the tensors are
    then checked against the digests recorded at save time, before the model is built.

    Args:
        path: the ``.safetensors`` file, the run directory, or a sharded checkpoint (its directory or index).
        head: if given, the head the caller expects; a checkpoint with another is an error.
        num_classes: if given, the class count the caller expects.
        map_location: device to put the model on.
        verify: check ``weights_sha256`` and ``config_sha256`` (a checkpoint without them loads with an
            :class:`UnverifiedCheckpointWarning`); False skips the check (``headreg eval --no-verify``).

    Returns:
        The :class:`HeadModel`, in eval mode.
    """
    from .factory import create_model

    config = read_config(path)
    if head is not None and head != config.get("head"):
        raise CheckpointError(f"checkpoint {path} has head {config.get('head')!r}, expected {head!r}")
    if num_classes is not None and num_classes != config.get("num_classes"):
        raise CheckpointError(f"checkpoint {path} has {config.get('num_classes')} classes, expected {num_classes}")
    sharded = _shards_dir(path)
    shards = _read_index(sharded) if sharded is not None else None
    weights = sharded / INDEX_NAME if sharded is not None else _weights_path(path)
    state = _read_tensors(weights) if shards is None else None
    _verify(config, state, weights, verify)
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
    if shards is not None:  # one file's tensor at a time, into the whole model
        fill_model(model, weights.parent, shards, verify=verify, where=str(weights))
    else:
        _fit(model, state, weights, strict=True)
    model.config["metadata"] = config.get("metadata", {})
    return model.to(map_location).eval()


def check_run_weights(run_dir: Path, train_config: Mapping[str, Any]) -> None:
    """Refuse a run record whose model or head is not the one of the run's saved weights (an edited run.json).

    A head edited in ``run.json`` would otherwise resume with the other head's weights whenever the two
    have the same shapes (ArcFace and CosFace do). A run without saved weights yet passes.

    Args:
        run_dir: the run directory (``model.safetensors`` is looked for there).
        train_config: the ``config`` of its ``run.json``.
    """
    if not (run_dir / WEIGHTS_NAME).is_file() and not (run_dir / INDEX_NAME).is_file():
        return
    saved = read_config(run_dir)
    record = run_dir / "run.json"
    options = {k: v for k, v in (train_config.get("head_options") or {}).items() if v is not None}
    pairs = (
        ("model", train_config.get("model"), saved.get("backbone")),
        ("head", train_config.get("head"), saved.get("head")),
        ("head_options", options, saved.get("head_options", {})),
    )
    for key, there, weights in pairs:
        if there != weights:
            raise CheckpointError(
                f"{record}: config.{key} is {there!r}, but the run's weights ({WEIGHTS_NAME}) were saved with "
                f"{weights!r}; was run.json edited? Restore it, or start a new run"
            )
