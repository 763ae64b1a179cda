"""headreg's own heads, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from ..hookspecs import RegisterHead, hookimpl
from .center import CenterLossHead
from .margin import ArcFaceHead, CombinedMarginHead, CosFaceHead, NormFaceHead
from .softmax import ModifiedSoftmaxHead, SoftmaxHead
from .sphereface import SphereFaceHead

BUILTIN_HEADS = {
    "softmax": SoftmaxHead,
    "modified_softmax": ModifiedSoftmaxHead,
    "normface": NormFaceHead,
    "sphereface": SphereFaceHead,
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
    "combined": CombinedMarginHead,
    "center": CenterLossHead,
}


@hookimpl
def register_heads(register: RegisterHead) -> None:
    for name, cls in BUILTIN_HEADS.items():
        register(name, cls)
