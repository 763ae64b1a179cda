"""LeNets++ (Wen et al. 2016), the backbone of the 2-D MNIST feature experiment.

Registered into timm, so ``timm.create_model("lenetpp", in_chans=1, num_classes=10)``
works once ``headreg.models`` is imported, and it follows timm's conventions:
``forward_features`` → ``forward_head(x, pre_logits=True)`` → classifier, timm's ``device``/``dtype``
factory arguments, ``feature_info`` (one entry per stage) for ``features_only=True``, TorchScript and FX.
"""

# No ``from __future__ import annotations`` and no class-level nn.Module annotations: TorchScript compiles
# this module and reads annotations as the attributes' types.
from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidValueError
from ._face import pop_factory_kwargs

try:  # newer torch: true under torch.fx.symbolic_trace only, not under torch.export / torch.compile
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # older torch: also true under torch.export, where skipping the check costs nothing
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

__all__ = ["LeNetPP"]


class LeNetPP(nn.Module):
    """LeNets++: three stages of two 5×5 convolutions with PReLU, each followed by 2×2 max pooling.

    Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition",
    ECCV 2016, §4.1 / Fig. 2: (5×5, 32)×2 → pool → (5×5, 64)×2 → pool → (5×5, 128)×2 → pool
    → fully connected embedding (2-D in the paper, to draw the features). The embedding
    layer is linear (``embed_act=True`` adds the PReLU of the authors' Caffe model).

    Args:
        in_chans: input channels.
        num_classes: classes of the linear classifier; 0 for an embedding extractor.
        embed_dim: width of the embedding layer (``num_features``).
        widths: channels of the three stages.
        batch_norm: batch norm after each convolution (not in the paper; trains faster).
        embed_act: PReLU after the embedding layer.
        input_size: ``(H, W)`` the flattened feature size is computed for.
        drop_rate: dropout before the classifier.
        feature_bn: batch norm on the flattened convolution features, which centres them
            (not in the paper; with ``embed_bias=False`` the embedding starts centred on the
            origin instead of on one side of it, which normalised-feature heads need).
        hidden_dim: width of a hidden fully connected layer (linear → batch norm → PReLU)
            between the convolutions and the embedding layer; 0 for none (the paper).
        embed_bias: bias in the embedding layer.
        **kwargs: timm's ``device`` and ``dtype`` factory arguments; ``global_pool``, which timm passes to
            every model, is accepted and ignored (the embedding layer stands where other models pool).
    """

    __jit_unused_properties__ = ["embedding_layer"]  # TorchScript cannot type its ``nn.Module`` return

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 2,
        widths: Sequence[int] = (32, 64, 128),
        batch_norm: bool = False,
        embed_act: bool = False,
        input_size: Sequence[int] = (28, 28),
        drop_rate: float = 0.0,
        feature_bn: bool = False,
        hidden_dim: int = 0,
        embed_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("global_pool", None)  # timm passes it to every model; LeNet++ flattens
        factory = pop_factory_kwargs("LeNetPP", kwargs)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dim
        self.drop_rate = drop_rate
        stages: list[nn.Module] = []
        prev = in_chans
        feature_info = []
        for i, width in enumerate(widths):
            layers: list[nn.Module] = []
            for _ in range(2):
                layers.append(nn.Conv2d(prev, width, 5, padding=2, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.PReLU(width))
                prev = width
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            feature_info.append({"num_chs": width, "reduction": 2 ** (i + 1), "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.feature_info = feature_info  # timm's features_only: each stage's output (after its pooling)
        h, w = input_size
        for _ in widths:
            h, w = h // 2, w // 2
        self.min_input_size = 2 ** len(widths)  # each stage halves H and W
        if h < 1 or w < 1:
            raise InvalidValueError(
                f"input_size {tuple(input_size)} is too small for LeNet++ with {len(widths)} stages: "
                f"the minimum is {self.min_input_size}×{self.min_input_size}"
            )
        self.input_size, self._pooled, self.num_stages = tuple(input_size), (h, w), len(widths)
        self.flat_dim = prev * h * w
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 0:
            raise ValueError(f"hidden_dim must be an integer >= 0, got {hidden_dim!r}")
        self.feature_norm = nn.BatchNorm1d(self.flat_dim) if feature_bn else nn.Identity()
        width = self.flat_dim
        if hidden_dim:
            self.hidden: nn.Module = nn.Sequential(
                nn.Linear(self.flat_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.PReLU(hidden_dim)
            )
            width = hidden_dim
        else:
            self.hidden = nn.Identity()
        self.embed = nn.Linear(width, embed_dim, bias=embed_bias)
        self.embed_act = nn.PReLU() if embed_act else nn.Identity()
        self.fc = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if factory:  # timm's device= / dtype= (its tests build every model on the meta device)
            self.to(**factory)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, C_last, H/8, W/8)`` feature maps."""
        # FX cannot branch on a traced shape, so a symbolically traced graph runs without the size check (a wrong
        # size then fails in the embedding layer's matmul). TorchScript keeps the check and skips the FX test,
        # which it could not compile.
        if not torch.jit.is_scripting():
            if _fx_tracing():
                return self.stages(x)
        if x.dim() == 4:
            self._check_size(x.shape[-2], x.shape[-1])
        return self.stages(x)

    def _check_size(self, h: int, w: int) -> None:
        # The embedding layer's width was fixed for input_size: other sizes fail in a matmul otherwise.
        k = self.min_input_size
        if (h // k, w // k) != self._pooled:
            (ph, pw), (ih, iw) = self._pooled, self.input_size
            raise InvalidInputError(
                f"images of {h}×{w} do not fit this LeNet++, built for input_size {ih}×{iw}: it takes H in "
                f"[{ph * k}, {ph * k + k - 1}] and W in [{pw * k}, {pw * k + k - 1}] (the minimum for any "
                f"LeNet++ of {self.num_stages} stages is {k}×{k}; "
                "build it with input_size=(H, W) for other sizes)"
            )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature maps → embedding ``(B, embed_dim)`` (``pre_logits``) or class logits."""
        x = self.embed_act(self.embed(self.hidden(self.feature_norm(torch.flatten(x, 1)))))
        if pre_logits:
            return x
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def embedding_layer(self) -> nn.Module:
        """The linear layer that outputs the embedding (``--head-lr-scale`` speeds it up with the head)."""
        return self.embed

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new linear classifier of ``num_classes`` (0: none), on the model's device and dtype and in its mode.

        ``global_pool`` is accepted for timm's signature and ignored, as in ``__init__``.
        """
        ref = self.embed.weight
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        else:
            self.fc = nn.Identity()
        self.fc.train(self.training)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": (3, 3),  # forward_features' map for the 28×28 input (three 2× poolings)
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.1307, 0.1307, 0.1307),  # MNIST statistics, repeated for 3-channel inputs
        "std": (0.3081, 0.3081, 0.3081),
        "first_conv": "stages.0.0",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"lenetpp": _cfg(), "lenetpp_bn": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LeNetPP:
    # features_only: one feature map per stage (timm's default out_indices assume five).
    num_stages = len(kwargs.get("widths", (32, 64, 128)))
    feature_cfg = {"flatten_sequential": True, "out_indices": tuple(range(num_stages))}
    return build_model_with_cfg(LeNetPP, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


@register_model
def lenetpp(pretrained: bool = False, **kwargs: Any) -> LeNetPP:
    """LeNets++ as in Wen et al. 2016 (no batch norm), 2-D embedding by default."""
    return _create("lenetpp", pretrained, **kwargs)


@register_model
def lenetpp_bn(pretrained: bool = False, **kwargs: Any) -> LeNetPP:
    """LeNets++ with batch norm after each convolution (headreg's variant; converges in fewer steps)."""
    return _create("lenetpp_bn", pretrained, **dict(dict(batch_norm=True), **kwargs))
