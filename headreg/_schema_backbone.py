"""The allow-list of backbone keyword arguments a checkpoint or a run record may carry, checked with
:func:`headreg._schema.validate`: model-shape options only. Nothing that names a file, a URL or a module
(``checkpoint_path``, ``pretrained``, ``pretrained_cfg*``) is accepted from a file, so loading a checkpoint
opens no file but its own and reaches no network. :func:`check_run_file` applies it, with the schemas of
:mod:`headreg._schema`, to the JSON files of a run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._schema import RESUME_META, RUN_RECORD, Field, _short, at_least, in_range, one_of, validate
from .errors import CheckpointError

__all__ = ["BACKBONE_KWARGS", "REFUSED_BACKBONE_KWARGS", "check_backbone_kwargs", "check_run_file"]

_POSITIVE_INT = Field("int", check=at_least(1))
_RATE = Field("number", check=in_range(0.0, 1.0, high_open=True))
_FLAG = Field("bool")

#: Backbone keyword arguments a checkpoint or a run record may carry: options that shape the model, with
#: values that are numbers, flags or a fixed choice. Everything else is refused when it comes from a file.
BACKBONE_KWARGS: Mapping[str, Field] = {
    # timm and torchvision, any backbone
    "in_chans": Field("int", check=in_range(1, 4096)),
    "drop_rate": _RATE,
    "drop_path_rate": _RATE,
    "drop_block_rate": _RATE,
    "proj_drop_rate": _RATE,
    "attn_drop_rate": _RATE,
    "pos_drop_rate": _RATE,
    "global_pool": Field("str", check=one_of("", "avg", "max", "avgmax", "catavgmax", "fast", "token", "map")),
    "output_stride": Field("int", check=one_of(8, 16, 32)),
    "img_size": Field("int", check=in_range(1, 8192)),
    "patch_size": Field("int", check=in_range(1, 1024)),
    # headreg's LeNet++ (headreg.models.lenetpp.LeNetPP)
    "embed_dim": _POSITIVE_INT,
    "widths": Field(
        "list", items=_POSITIVE_INT, check=lambda v: None if 1 <= len(v) <= 8 else "must hold 1 to 8 widths"
    ),
    "batch_norm": _FLAG,
    "embed_act": _FLAG,
    "input_size": Field("list", items=_POSITIVE_INT, check=lambda v: None if len(v) == 2 else "must be [H, W]"),
    "feature_bn": _FLAG,
    "hidden_dim": Field("int", check=at_least(0)),
    "embed_bias": _FLAG,
    # headreg's IResNet and MobileFaceNet (headreg.models.iresnet, headreg.models.mobilefacenet)
    "fp16": _FLAG,
}

#: Keys refused from a file with a reason of their own (they make timm open a file or fetch a URL, or
#: collide with what headreg passes itself); any other key outside :data:`BACKBONE_KWARGS` is refused too.
REFUSED_BACKBONE_KWARGS: Mapping[str, str] = {
    "checkpoint_path": "it names a file that timm would torch.load",
    "pretrained": "it makes timm download or open pretrained weights",
    "pretrained_cfg": "it can name a file or a URL to load weights from",
    "pretrained_cfg_overlay": "it can name a file or a URL to load weights from",
    "pretrained_file": "it names a file to load weights from",
    "pretrained_strict": "it only matters when loading pretrained weights",
    "cache_dir": "it names a directory to download into",
    "num_classes": "headreg sets the backbone's num_classes itself; the head's class count is the config's",
    "features_only": "headreg needs the pooled features",
}


def check_backbone_kwargs(kwargs: Any, *, where: str, key: str = "backbone_kwargs") -> dict[str, Any]:
    """Refuse any backbone keyword argument a file may not carry (see :data:`BACKBONE_KWARGS`).

    Args:
        kwargs: the ``backbone_kwargs`` (checkpoint) or ``model_options`` (run record) read from a file.
        where: the file, for the message.
        key: the name of the object in the file.

    Returns:
        ``kwargs``, checked.
    """
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: {key} must be an object, got {_short(kwargs)}")
    for name in kwargs:
        if name in REFUSED_BACKBONE_KWARGS:
            raise CheckpointError(
                f"{where}: {key}.{name} is refused from a file: {REFUSED_BACKBONE_KWARGS[name]} "
                "(pass it to headreg.create_model yourself if you mean it)"
            )
        if name not in BACKBONE_KWARGS:
            raise CheckpointError(
                f"{where}: {key}.{name} is not an allowed backbone option in a file; allowed: "
                f"{', '.join(sorted(BACKBONE_KWARGS))}"
            )
    validate(kwargs, BACKBONE_KWARGS, where=where, key=key)
    return kwargs


def check_run_file(name: str, obj: Any, where: str) -> Any:
    """Validate a JSON file of a run directory by its name (``run.json``, ``resume.json``); others pass as read.

    Args:
        name: the file's name in the run directory.
        obj: its parsed content.
        where: its path, for the message.

    Returns:
        ``obj``, checked.
    """
    if name == "run.json":
        validate(obj, RUN_RECORD, where=where)
        check_backbone_kwargs(obj["config"].get("model_options", {}), where=where, key="config.model_options")
    elif name == "resume.json":
        validate(obj, RESUME_META, where=where)
    return obj
