"""Declared schemas for the JSON headreg reads back from disk, and the one validator that applies them.

A file read from disk is untrusted input (a checkpoint is made to be shared), so what it holds is checked
against a declared schema, known keys, types and ranges, before anything is built from it. A schema is a
plain mapping ``key -> Field``; :func:`validate` walks it and raises one error that names the file and the
key (``run.json: config.epochs must be an integer >= 1, got -5``).

The schemas here: the model config (``config.json`` and the config in ``model.safetensors``' metadata,
:data:`MODEL_CONFIG`), the run record (``run.json``, :data:`RUN_RECORD`), the resumable state's JSON
(``resume.json``, :data:`RESUME_META`) and one ``metrics.jsonl`` line (:data:`METRICS_LINE`). The
allow-list of backbone keyword arguments a file may carry (:mod:`headreg._schema_backbone`) holds model-shape options
only; nothing that names a file, a URL or a module (``checkpoint_path``, ``pretrained``, ``pretrained_cfg*``)
is accepted from a file, so loading a checkpoint opens no file but its own and reaches no network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, HeadregError

__all__ = [
    "Field",
    "validate",
    "MODEL_CONFIG",
    "RUN_RECORD",
    "RESUME_META",
    "SHARD_INDEX",
    "METRICS_LINE",
]

#: A check returns what is wrong with a value (``"must be >= 0"``), or None when it is fine.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Field:
    """One key of a schema.

    Attributes:
        kind: the JSON type: ``"int"`` (not a bool), ``"number"`` (int or float, not a bool, finite),
            ``"bool"``, ``"str"``, ``"list"``, ``"dict"`` or ``"any"``.
        required: the key must be present.
        nullable: ``null`` is accepted.
        check: a further check of the value (ranges, choices).
        schema: for a ``dict``, the schema of its keys (None: any keys).
        items: for a ``list``, the field every item must match.
        open: for a ``dict`` with a schema, keys outside it are accepted (and not checked).
        values: for a ``dict``, the field every value must match (its keys are free: a map).
    """

    kind: str
    required: bool = False
    nullable: bool = False
    check: Check | None = None
    schema: Mapping[str, Field] | None = None
    items: Field | None = None
    open: bool = False
    values: Field | None = None


_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": (
        "a finite number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    ),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "any": ("anything", lambda v: True),
}


def validate(
    obj: Any,
    schema: Mapping[str, Field] | Field,
    *,
    where: str,
    error: type[HeadregError] = CheckpointError,
    key: str = "",
) -> Any:
    """Check ``obj`` (a parsed JSON object) against ``schema``; return it unchanged, or raise ``error``.

    Args:
        obj: what was read.
        schema: ``key -> Field`` of the top level (keys not in it are refused), or a :class:`Field`.
        where: the file, for the message (``"/runs/a/run.json"``).
        error: the error class to raise (:class:`~headreg.errors.CheckpointError` for checkpoints and runs).
        key: the dotted path of ``obj`` inside the file (for nested calls).

    Returns:
        ``obj``.
    """
    spec = schema if isinstance(schema, Field) else Field("dict", schema=schema)
    _check(obj, spec, where=where, error=error, key=key)
    return obj


def _check(value: Any, field: Field, *, where: str, error: type[HeadregError], key: str) -> None:
    name = key or "the top level"
    if value is None:
        if field.nullable:
            return
        raise error(f"{where}: {name} must not be null")
    noun, ok = _KINDS[field.kind]
    if not ok(value):
        raise error(f"{where}: {name} must be {noun}, got {_short(value)}")
    if field.kind == "dict" and field.schema is not None:
        unknown = [] if field.open else sorted(set(value) - set(field.schema))
        if unknown:
            raise error(
                f"{where}: unknown key {_join(key, unknown[0])!r}; known keys: {', '.join(sorted(field.schema))}"
            )
        for sub, spec in field.schema.items():
            if sub in value:
                _check(value[sub], spec, where=where, error=error, key=_join(key, sub))
            elif spec.required:
                raise error(f"{where}: required key {_join(key, sub)!r} is missing")
    if field.kind == "dict" and field.values is not None:
        for sub, item in value.items():
            _check(item, field.values, where=where, error=error, key=_join(key, str(sub)))
    if field.kind == "list" and field.items is not None:
        for i, item in enumerate(value):
            _check(item, field.items, where=where, error=error, key=f"{name}[{i}]")
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise error(f"{where}: {name} {problem}, got {_short(value)}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- checks
def at_least(low: float) -> Check:
    """A check: ``value >= low``."""
    return lambda v: None if v >= low else f"must be >= {low}"


def in_range(low: float, high: float, *, high_open: bool = False) -> Check:
    """A check: ``low <= value <= high`` (``< high`` when ``high_open``)."""
    closing = ")" if high_open else "]"

    def check(v: Any) -> str | None:
        inside = low <= v < high if high_open else low <= v <= high
        return None if inside else f"must be in [{low}, {high}{closing}"

    return check


def one_of(*choices: Any) -> Check:
    """A check: the value is one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(repr(c) for c in choices)}"


def _sha256_hex(v: str) -> str | None:
    ok = len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    return None if ok else "must be 64 lowercase hexadecimal digits (a SHA-256)"


def _backbone_name(v: str) -> str | None:
    # timm resolves "hf-hub:org/name" and "local-dir:/path" by fetching or opening them: a file may only
    # name a registered model (timm's, torchvision/<name>, headreg's own).
    if not v or len(v) > 200 or ":" in v:
        return "must be a registered model name (no hub or path prefix such as 'hf-hub:')"
    return None


# ---------------------------------------------------------------------------------------------- the files
_HEAD_NAME = Field("str", check=lambda v: None if 0 < len(v) <= 128 else "must be a name of 1 to 128 characters")

#: ``config.json`` and the ``headreg_config`` metadata of ``model.safetensors`` (``headreg.save_model``).
MODEL_CONFIG: Mapping[str, Field] = {
    "format": Field("str", required=True),
    "headreg_version": Field("str"),
    "backbone": Field("str", required=True, check=_backbone_name),
    # its keys are checked against the allow-list by check_backbone_kwargs
    "backbone_kwargs": Field("dict"),
    "head": Field("str", nullable=True, check=_HEAD_NAME.check),
    # keys and values are the head's to check, when it is built (strict option types in headreg.heads.base)
    "head_options": Field("dict"),
    "num_classes": Field("int", check=at_least(0)),
    "embedding_dim": Field("int", nullable=True, check=at_least(1)),
    "neck": Field("str", nullable=True, check=one_of("linear_bn", "linear", "none")),
    "neck_dropout": Field("number", check=in_range(0.0, 1.0)),
    "metadata": Field("dict"),
    "weights_sha256": Field("str", check=_sha256_hex),
    "config_sha256": Field("str", check=_sha256_hex),
}

_STEP, _EPOCH = Field("int", nullable=True, check=at_least(0)), Field("int", nullable=True, check=at_least(1))
_VALIDATION_CONFIG = {  # the TrainConfig fields of validation during training (engine/_validate.py)
    "val": Field("list", items=Field("str")), "val_every": Field("str"), "keep_best": Field("str", nullable=True),
    "early_stop": Field("int", nullable=True, check=at_least(1)), "tensorboard": Field("bool"),
}  # fmt: skip
_VALIDATION_STATE = {  # its part of the resumable state
    "best": Field("number", nullable=True), "best_epoch": _EPOCH, "best_step": _STEP,
    "bad": Field("int", check=at_least(0)), "last_step": _STEP, "ended": Field("str", nullable=True),
}  # fmt: skip
_VAL_LINE = {  # a validation's line in metrics.jsonl
    "step": Field("int", check=at_least(0)), "val_time": Field("number", check=at_least(0.0)),
    "val": Field("dict", values=Field("dict", values=Field("number", nullable=True))), "early_stop": Field("str"),
    "best": Field("dict", schema={"metric": Field("str", required=True), "value": Field("number", nullable=True),
                                  "epoch": _EPOCH, "step": _STEP, "improved": Field("bool")}),
}  # fmt: skip

#: The training config inside ``run.json`` (``headreg.engine.train.TrainConfig``); the dataclass checks
#: the rest of its values when it is built.
TRAIN_CONFIG: Mapping[str, Field] = {
    "model": Field("str", check=_backbone_name),
    "head": _HEAD_NAME,
    "dataset": Field("str"),
    "embedding_dim": Field("int", nullable=True, check=at_least(1)),
    "num_classes": Field("int", nullable=True, check=at_least(1)),
    "neck": Field("str", nullable=True, check=one_of("linear_bn", "linear", "none")),
    "model_options": Field("dict"),
    "head_options": Field("dict"),
    "epochs": Field("int", check=at_least(1)),
    "batch_size": Field("int", check=at_least(1)),
    "lr": Field("number", nullable=True, check=at_least(0.0)),
    "weight_decay": Field("number", check=at_least(0.0)),
    "optimizer": Field("str"),
    "momentum": Field("number", check=at_least(0.0)),
    "schedule": Field("str"),
    "warmup_epochs": Field("number", check=at_least(0.0)),
    "head_lr_scale": Field("number"),
    "head_warmup": Field("dict"),
    "amp": Field("bool", nullable=True),
    "device": Field("str"),
    "seed": Field("int"),
    "limit": Field("int", nullable=True, check=at_least(1)),
    "test_limit": Field("int", nullable=True, check=at_least(1)),
    "augment": Field("bool"),
    "input_size": Field("int", nullable=True, check=at_least(1)),
    "data_dir": Field("str", nullable=True),
    "eval_metrics": Field("list", items=Field("str")),
    "eval_limit": Field("int", nullable=True, check=at_least(1)),
    "shard_head": Field("bool"),
    "sample_rate": Field("number", check=in_range(0.0, 1.0)),
    # fine-tuning and the step guard (docs/train.md)
    "pretrained": Field("bool"),
    "freeze_backbone": Field("int", check=at_least(0)),
    "backbone_lr_scale": Field("number"),
    "clip_grad_norm": Field("number", nullable=True),
    "accumulate": Field("int", check=at_least(1)),
    "max_bad_steps": Field("int", check=at_least(0)),
    **_VALIDATION_CONFIG,
}

#: ``run.json``: the run record the training runner writes.
RUN_RECORD: Mapping[str, Field] = {
    "format": Field("str"),
    "config": Field("dict", required=True, schema=TRAIN_CONFIG),
    "status": Field("str", check=one_of("running", "stopped", "completed")),
    "epochs_done": Field("int", check=at_least(0)),
    "global_step": Field("int", check=at_least(0)),
    "world_size": Field("int", check=at_least(1)),
    "device": Field("str"),
    "amp": Field("str", nullable=True),
    "num_classes": Field("int", nullable=True, check=at_least(1)),
    "headreg_version": Field("str"),
    "torch_version": Field("str"),
    "replica_max_abs_diff": Field("number", nullable=True),  # the DDP replica check
    "early_stop": Field("str"),  # why --early-stop ended the run
}

_PROGRESS: Mapping[str, Field] = {
    "epoch": Field("int", required=True, check=at_least(0)),
    "global_step": Field("int", required=True, check=at_least(0)),
    "steps_per_epoch": Field("int", check=at_least(1)),
    "world_size": Field("int", check=at_least(1)),
    "tally": Field("any", nullable=True),
}

#: A sharded checkpoint's index (``model.safetensors.index.json``; ``resume.json``'s ``shards``), see
#: :mod:`headreg.models._shards`. The file names are checked there against the shard-file pattern.
SHARD_INDEX: Mapping[str, Field] = {
    "metadata": Field(
        "dict",
        required=True,
        schema={
            "format": Field("str", required=True),
            "generation": Field("int", required=True, check=at_least(1)),
            "num_classes": Field("int", required=True, check=at_least(1)),
            "sha256": Field("dict", required=True, values=Field("str", check=_sha256_hex)),
        },
    ),
    "weight_map": Field("dict", required=True, values=Field("str")),
    "row_shards": Field("dict", required=True, values=Field("list", items=Field("list"))),
}

#: ``resume.json``: the JSON half of the resumable state (``RunDir.save_state``).
RESUME_META: Mapping[str, Field] = {
    "format": Field("str", required=True),
    "global_step": Field("str", required=True),
    "generation": Field("int", check=at_least(0)),  # which resume-<N>.safetensors holds the tensors
    "weights_sha256": Field("str", check=_sha256_hex),
    "shards": Field("dict"),  # a class-sharded run's files, checked against SHARD_INDEX when read
    "state": Field(
        "dict",
        required=True,
        schema={
            "model": Field("dict"),
            "optimizer": Field("any"),
            "scaler": Field("any", nullable=True),
            "rng": Field("list"),
            "transform_rng": Field("list"),
            "progress": Field("dict", required=True, schema=_PROGRESS),
            "validation": Field("dict", nullable=True, schema=_VALIDATION_STATE),
        },
        open=True,  # the trainer's own parts of the state; join_state only rebuilds them
    ),
}

#: One ``metrics.jsonl`` line: the epoch it closes (or a validation's: ``val`` = ``{protocol: {metric: value}}``).
METRICS_LINE = Field("dict", schema={"epoch": Field("int", required=True, check=at_least(1)), **_VAL_LINE}, open=True)
