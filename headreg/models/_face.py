"""What headreg's face backbones (IResNet, MobileFaceNet) share: timm's factory and classifier conventions."""

from typing import Any

import torch
from timm.layers import register_notrace_module
from torch import nn

__all__ = ["FaceClassifierMixin", "FixedScaleBatchNorm1d", "pop_factory_kwargs"]


def pop_factory_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take timm's ``device``/``dtype`` factory arguments out of ``kwargs``; anything else left is an error."""
    factory = {k: kwargs.pop(k) for k in ("device", "dtype") if kwargs.get(k) is not None}
    kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"{name} got unexpected arguments: {sorted(kwargs)}")
    return factory


@register_notrace_module  # FX: a leaf, as torch's own BatchNorm1d (its input check branches on the shape)
class FixedScaleBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose scale is a buffer fixed at 1: it centres and shifts, never rescales.

    insightface builds its IResNet embedding BN with ``requires_grad=False`` on the weight; a buffer keeps
    the same state-dict key (``weight``) and the same arithmetic, and leaves no parameter without a gradient.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        del self.weight
        self.register_buffer("weight", torch.ones(num_features))


class FaceClassifierMixin:
    """``get_classifier`` / ``reset_classifier`` over a linear ``classifier`` on the ``num_features`` embedding.

    The embedding tail (IResNet's flatten → linear → BN, MobileFaceNet's GDC) stands where other timm models
    pool: ``global_pool=""`` removes it, so the model outputs the ``(B, 512, 7, 7)`` map (timm's contract);
    any other value keeps it.
    """

    # No class-level annotations: TorchScript would read them as the attributes' types.

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new linear classifier of ``num_classes`` (0: none), on the model's device and dtype and in its mode."""
        ref = next(self.parameters())  # type: ignore[attr-defined]
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)  # type: ignore[attr-defined]
        else:
            self.classifier = nn.Identity()
        self.classifier.train(self.training)  # type: ignore[attr-defined]
