"""Built-in loss heads and the shared pieces plugin heads may reuse."""

from ._geometry import (
    arcface_margin_feasibility,
    class_separation,
    combined_margin_feasibility,
    cosface_margin_feasibility,
)
from .base import (
    Head,
    HeadOutput,
    check_embeddings,
    check_labels,
    float32_region,
    head_fused_terms,
    head_is_angular,
    head_margin_feasibility,
    head_settings_2d,
)
from .center import CenterLossHead
from .margin import AngularMarginHead, ArcFaceHead, CombinedMarginHead, CosFaceHead, NormFaceHead
from .softmax import ModifiedSoftmaxHead, SoftmaxHead
from .sphereface import SphereFaceHead

__all__ = [
    "Head",
    "HeadOutput",
    "check_embeddings",
    "check_labels",
    "float32_region",
    "head_fused_terms",
    "head_is_angular",
    "head_margin_feasibility",
    "head_settings_2d",
    "class_separation",
    "arcface_margin_feasibility",
    "combined_margin_feasibility",
    "cosface_margin_feasibility",
    "AngularMarginHead",
    "ArcFaceHead",
    "CenterLossHead",
    "CombinedMarginHead",
    "CosFaceHead",
    "ModifiedSoftmaxHead",
    "NormFaceHead",
    "SoftmaxHead",
    "SphereFaceHead",
]
