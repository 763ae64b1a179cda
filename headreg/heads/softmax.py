"""Softmax and modified softmax: the two baselines without a margin."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Head, HeadOutput, check_bool
from .functional import FusedTerms, cosine_linear, fused_output, normalize

__all__ = ["SoftmaxHead", "ModifiedSoftmaxHead"]


class SoftmaxHead(Head):
    """Linear classifier and cross-entropy: ``logits = W x + b``.

    The baseline every margin head is compared with. Logits are the same with and
    without labels.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        bias: Learn a per-class bias ``b``.
    """

    paper = "https://en.wikipedia.org/wiki/Softmax_function"
    shardable: ClassVar[bool] = True  # column c is w_c·x + b_c

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes)
        layer = nn.Linear(in_features, num_classes, bias=check_bool("bias", bias))  # PyTorch's default init
        self.weight = layer.weight
        self.bias = layer.bias

    def inference_logits(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def fused_terms(self, x: Tensor) -> FusedTerms:
        """The linear logits as they are: no normalisation, no margin, scale 1 (the bias stays the head's)."""
        return FusedTerms(x, 1.0, None, normalize_weight=False)

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fused_output(self.fused_terms(x), self.weight.to(x.dtype), labels, bias)


class ModifiedSoftmaxHead(Head):
    """Modified softmax: unit-norm class weights, no bias, ``logits = ‖x‖ cos θ``.

    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017,
    §3.1 (Eq. 3-4): normalising the weights and dropping the bias makes the decision
    boundary depend on the angle only; the feature norm is kept. It is A-Softmax with
    ``m = 1``. Trained with cross-entropy on these logits.

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
    """

    paper = "https://arxiv.org/abs/1704.08063"
    angular: ClassVar[bool] = True  # unit-norm weights, no bias: the decision is by angle
    shardable: ClassVar[bool] = True  # column c is ‖x‖ cos θ_c

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=0.01))

    def inference_logits(self, x: Tensor) -> Tensor:
        cos = cosine_linear(x, self.weight.to(x.dtype))
        return cos * x.norm(dim=1, keepdim=True)

    def fused_terms(self, x: Tensor) -> FusedTerms:
        """``x̂`` with the per-row scale ``‖x‖`` (differentiable), no margin."""
        return FusedTerms(normalize(x), x.norm(dim=1), None)

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        return fused_output(self.fused_terms(x), self.weight.to(x.dtype), labels)
