"""Built-in loss heads and the shared pieces plugin heads may reuse."""

from .base import Head, HeadOutput, check_embeddings, check_labels, float32_region
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
