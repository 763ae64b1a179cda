"""headreg: a plugin registry of metric-learning loss heads for timm and torchvision backbones.

Importing headreg is cheap: torch, timm and the plugins load on first use of the
names below (``headreg --help`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .hookspecs import hookimpl

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "HeadOutput": "headreg.heads.base",
    "Head": "headreg.heads.base",
    "list_heads": "headreg.registry",
    "create_head": "headreg.registry",
    "get_head_class": "headreg.registry",
    "register_head": "headreg.registry",
    "create_model": "headreg.models",
    "HeadModel": "headreg.models",
    "save_model": "headreg.models",
    "load_model": "headreg.models",
    "list_backbones": "headreg.models",
}

__all__ = [
    "__version__",
    "hookimpl",
    "Head",
    "HeadModel",
    "HeadOutput",
    "create_head",
    "create_model",
    "get_head_class",
    "list_backbones",
    "list_heads",
    "load_model",
    "register_head",
    "save_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from .heads.base import Head, HeadOutput
    from .models import HeadModel, create_model, list_backbones, load_model, save_model
    from .registry import create_head, get_head_class, list_heads, register_head


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'headreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
