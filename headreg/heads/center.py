"""Center loss: softmax cross-entropy plus a pull of each feature towards its class centre."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidValueError
from .base import Head, HeadOutput, check_bool, check_number, checked_property
from .functional import FusedTerms, fused_output


def _check_lambda_c(name: str, value: float) -> float:
    # Far above the paper's 0.003-0.1 the centre term swamps the softmax; 1e300 overflows the loss to inf.
    return check_number(name, value, low=0.0, high=1e3)


__all__ = ["CenterLossHead"]

_UPDATES = ("alpha", "sgd")


class CenterLossHead(Head):
    """Softmax cross-entropy plus ``λ · ½ ‖x − c_y‖²``, averaged over the batch.

    Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
    ECCV 2016, Eq. 2 and 5. The paper sums both terms over the mini-batch; here both are
    averaged, which leaves λ's meaning unchanged.

    Centre update, ``center_update``:

    - ``"alpha"`` (default, the paper's rule, Eq. 4): centres are a buffer, not touched by
      the optimiser. After each training forward,
      ``c_j ← c_j − α Σ_{i: y_i = j}(c_j − x_i) / (1 + n_j)``, computed with the centres the
      loss used. Under ``torch.distributed`` the sums are all-reduced so all ranks agree.
    - ``"sgd"``: centres are an ``nn.Parameter`` learned by the optimiser from the gradient
      of the centre term (the common PyTorch re-implementation).

    Defaults ``λ = 0.003``, ``α = 0.5`` (the paper's face experiments).

    Args:
        in_features: Embedding width ``D``.
        num_classes: Number of classes ``C``.
        lambda_c: weight λ of the centre term, in ``[0, 1000]`` (the paper uses 0.003 to 0.1).
        alpha: centre learning rate α in [0, 1] for the ``"alpha"`` rule.
        center_update: ``"alpha"`` or ``"sgd"``.
        bias: learn a bias in the softmax classifier.
    """

    paper = "https://ydwen.github.io/papers/WenECCV16.pdf"
    # A trainer may ramp λ in (`headreg train --head-warmup lambda_c=0:0.5`): softmax shapes
    # the features first, then the pull towards the centres sets in.
    warmup_attributes: tuple[str, ...] = ("lambda_c",)
    lambda_c = checked_property("lambda_c", _check_lambda_c, "The weight λ of the centre term, in ``[0, 1000]``.")
    # λ = 0.003 is the paper's face setting; with 2-D features 0.01 gives visibly tighter clusters at the
    # same accuracy, while 0.05 costs accuracy (measured in docs/compare.md, "2-D settings per head").
    settings_2d: ClassVar[Mapping[str, Any]] = {"lambda_c": 0.01, "alpha": 0.5}
    # Column c is w_c·x + b_c; the centre term of a sample needs its own class's centre only, so the
    # centres shard with the weights (each rank pulls the samples of its classes; docs/scale.md).
    shardable: ClassVar[bool] = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        lambda_c: float = 0.003,
        alpha: float = 0.5,
        center_update: str = "alpha",
        bias: bool = True,
    ) -> None:
        super().__init__(in_features, num_classes)
        self.lambda_c = lambda_c
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        if center_update not in _UPDATES:
            raise InvalidValueError(f"center_update must be one of {_UPDATES}, got {center_update!r}")
        self.center_update = center_update
        layer = nn.Linear(in_features, num_classes, bias=check_bool("bias", bias))
        self.weight = layer.weight
        self.bias = layer.bias
        centers = torch.zeros(num_classes, in_features)
        if center_update == "sgd":
            self.centers = nn.Parameter(centers.normal_())
        else:
            self.register_buffer("centers", centers)

    def inference_logits(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def shard_terms(self, x: Tensor) -> FusedTerms:
        """The softmax part for the class-sharded wrapper: linear logits, no margin, scale 1 (bias: the head's).

        Not ``fused_terms``: the loss is more than this cross-entropy (:meth:`partial_penalty` adds the rest).
        """
        return FusedTerms(x, 1.0, None, normalize_weight=False)

    def partial_penalty(self, x: Tensor, labels: Tensor, *, sharded: bool) -> Tensor:
        """``λ · ½ Σ ‖x_b − c_{y_b}‖²`` over the rows whose class ``labels[b]`` is this head's (``>= 0``).

        In training with the ``"alpha"`` rule it also moves those centres (Eq. 4): all-reduced under
        ``torch.distributed`` unless ``sharded`` (then ``x`` is already every rank's batch).
        """
        here = labels >= 0
        if not bool(here.all()):
            keep = here.nonzero().squeeze(1)
            x, labels = x.index_select(0, keep), labels.index_select(0, keep)
        diff = x - self.centers.to(x.dtype).index_select(0, labels)  # (B, D)
        if self.training and self.center_update == "alpha" and self.alpha > 0:
            self._alpha_update(diff.detach(), labels, reduce=not sharded)
        return self.lambda_c * 0.5 * diff.pow(2).sum()

    def training_output(self, x: Tensor, labels: Tensor) -> HeadOutput:
        # The softmax part through the fused cross-entropy (linear logits, one (B, C) buffer).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = fused_output(self.shard_terms(x), self.weight.to(x.dtype), labels, bias)
        out.loss = out.loss + self.partial_penalty(x, labels, sharded=False) / x.shape[0]
        return out

    @torch.no_grad()
    def _alpha_update(self, diff: Tensor, labels: Tensor, *, reduce: bool) -> None:
        # Eq. 4 over the classes present; `diff` is x − c_y, so Σ(c_j − x_i) = −Σ diff.
        diff = diff.to(self.centers.dtype)
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # all_reduce needs the same shape on every rank: sum over all C classes.
            sums = torch.zeros_like(self.centers).index_add_(0, labels, diff)
            counts = torch.bincount(labels, minlength=self.num_classes).to(self.centers.dtype)
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            self.centers.add_(sums / (1.0 + counts).unsqueeze(1), alpha=self.alpha)
            return
        # Single process: only the classes in the batch, never a (C, D) temporary.
        present, inverse = torch.unique(labels, return_inverse=True)
        sums = torch.zeros(len(present), diff.shape[1], dtype=diff.dtype, device=diff.device).index_add_(
            0, inverse, diff
        )
        counts = torch.bincount(inverse, minlength=len(present)).to(diff.dtype)
        self.centers.index_add_(0, present, sums / (1.0 + counts).unsqueeze(1), alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_c={self.lambda_c:g}, alpha={self.alpha:g}, update={self.center_update}"
