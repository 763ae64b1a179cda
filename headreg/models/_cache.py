"""Pretrained weights from the local caches only: what ``headreg train --pretrained`` and ``headreg eval
--pretrained`` load, never downloading.

timm reads weights through the Hugging Face Hub client (``huggingface_hub``) or, for older models, through
``torch.hub.load_state_dict_from_url``; torchvision through the latter. Inside :func:`cache_only` the Hub
client runs in its offline mode (cached files are served, a miss raises instead of fetching), and the one
function through which ``torch.hub`` (and timm's copy of it) downloads a missing file raises
:class:`NotCachedError` instead. A cached file loads as usual in both.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["NotCachedError", "cache_only"]

_LOCK = threading.Lock()


class NotCachedError(OSError):
    """A pretrained file that is not in the local cache, inside :func:`cache_only`."""


def _refuse(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
    raise NotCachedError(f"{url} is not in the local cache (looked for {dst}) and headreg does not download")


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Within the block, timm and torchvision load pretrained weights from the local caches or fail."""
    import torch.hub

    patches: list[tuple[Any, str, Any]] = [(torch.hub, "download_url_to_file", _refuse)]
    timm_hub = sys.modules.get("timm.models._hub")
    if timm_hub is not None and hasattr(timm_hub, "download_url_to_file"):
        patches.append((timm_hub, "download_url_to_file", _refuse))
    try:
        import huggingface_hub.constants as hf_constants

        patches.append((hf_constants, "HF_HUB_OFFLINE", True))
    except ImportError:  # pragma: no cover - timm depends on it
        pass
    with _LOCK:
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
