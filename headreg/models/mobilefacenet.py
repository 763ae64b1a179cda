"""MobileFaceNet (Chen et al. 2018), as insightface's arcface_torch trains it (``mbf``).

Chen, Liu, Gao and Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
Mobile Devices", CCBR 2018 (arXiv:1804.07573): inverted-residual bottlenecks with PReLU, and a global
depthwise convolution (GDC, a 7×7 depthwise kernel over the last map) instead of global pooling.
Registered into timm as ``mobilefacenet`` (insightface's ``get_mbf``: ``blocks=(1, 4, 6, 2)``,
``scale=2``). Parameter names are insightface's, so its ``backbone.pth`` loads as it is.

- ``forward_features``: ``(B, 3, 112, 112) -> (B, 512, 7, 7)`` (the body, then the 1×1 ``conv_sep``).
- ``forward_head(x, pre_logits=True)``: the GDC tail (7×7 depthwise conv → BN → linear → BN),
  ``(B, 512)`` embeddings; ``num_classes > 0`` adds a linear ``classifier``.
"""

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ._face import FaceClassifierMixin, pop_factory_kwargs

__all__ = ["MobileFaceNet"]


class ConvBN(nn.Module):
    """Convolution (no bias) → BN, then PReLU unless ``act=False`` (a linear bottleneck's projection).

    The padding keeps the size (``kernel // 2``) unless given (the GDC's 7×7 kernel takes none).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel, stride, pad, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        if act:
            layers.append(nn.PReLU(out_chs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DepthwiseBlock(nn.Module):
    """Inverted bottleneck: 1×1 expansion → 3×3 depthwise (stride) → 1×1 linear projection (+ input).

    Args:
        in_chs: input channels.
        out_chs: output channels.
        hidden: channels of the expansion (insightface's ``groups``).
        stride: stride of the depthwise convolution.
        residual: add the input (needs ``stride == 1`` and ``in_chs == out_chs``).
    """

    def __init__(self, in_chs: int, out_chs: int, hidden: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(in_chs, hidden),
            ConvBN(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, out_chs, act=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class _Repeat(nn.Module):
    """``depth`` residual depthwise blocks of constant width (insightface's ``Residual``)."""

    def __init__(self, chs: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthwiseBlock(chs, chs, hidden, residual=True) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _GDC(nn.Module):
    """Global depthwise convolution → BN → linear → BN: ``(B, 512, 7, 7) -> (B, num_features)``."""

    def __init__(self, chs: int, num_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(chs, chs, 7, groups=chs, act=False, padding=0),
            nn.Flatten(),
            nn.Linear(chs, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MobileFaceNet(FaceClassifierMixin, nn.Module):
    """MobileFaceNet for 112×112 faces with a 512-d GDC embedding; see the module docstring.

    Args:
        in_chans: input channels.
        num_classes: classes of a linear classifier on the embedding; 0 for an embedding extractor.
        num_features: embedding width (512 in insightface).
        blocks: residual blocks of the four stages (``(1, 4, 6, 2)``; insightface's large model
            ``(2, 8, 12, 4)`` with ``scale=4``).
        scale: width multiplier of the stages (64·scale, then 128·scale channels).
        fp16: run the body under CUDA fp16 autocast and ``conv_sep`` and the tail in float32, as
            insightface's ``fp16=True``; no effect on CPU.
        global_pool: ``""`` leaves out the embedding tail, so ``forward`` returns the ``(B, 512, 7, 7)``
            map (timm's "no pooling"); any other value keeps it.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 0,
        num_features: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        fp16: bool = False,
        global_pool: str = "embed",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        factory = pop_factory_kwargs("MobileFaceNet", kwargs)
        self.in_chans, self.num_classes, self.fp16 = in_chans, num_classes, bool(fp16)
        self.global_pool = global_pool  # "" skips the embedding tail (timm's unpooled output)
        self.num_features = self.head_hidden_size = num_features
        c1, c2 = 64 * scale, 128 * scale
        # The expansion widths (128, 256, 512) are insightface's, whatever the scale.
        second = ConvBN(c1, c1, 3, groups=64) if blocks[0] == 1 else _Repeat(c1, blocks[0], 128)
        self.layers = nn.Sequential(
            ConvBN(in_chans, c1, 3, 2),
            second,
            DepthwiseBlock(c1, c1, 128, stride=2),
            _Repeat(c1, blocks[1], 128),
            DepthwiseBlock(c1, c2, 256, stride=2),
            _Repeat(c2, blocks[2], 256),
            DepthwiseBlock(c2, c2, 512, stride=2),
            _Repeat(c2, blocks[3], 256),
        )
        self.conv_sep = ConvBN(c2, 512)
        self.features = _GDC(512, num_features)
        self.classifier: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": c1, "reduction": 2, "module": "layers.1"},
            {"num_chs": c1, "reduction": 4, "module": "layers.3"},
            {"num_chs": c2, "reduction": 8, "module": "layers.5"},
            {"num_chs": 512, "reduction": 16, "module": "conv_sep"},
        ]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # insightface's
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if factory:  # timm's device= / dtype= (its tests build every model on the meta device)
            self.to(**factory)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, 112, 112) -> (B, 512, 7, 7)``, float32 (``conv_sep`` runs outside fp16)."""
        x = self._body_fp16(x) if self.fp16 else self.layers(x)
        return self.conv_sep(x.to(self.conv_sep.layers[0].weight.dtype))

    @torch.jit.unused
    def _body_fp16(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            return self.layers(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature maps → ``(B, num_features)`` embeddings (``pre_logits``) or class logits."""
        if self.global_pool == "":
            return x
        x = self.features(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "mobilefacenet": {
            "num_classes": 0,
            "input_size": (3, 112, 112),
            "pool_size": (7, 7),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),  # insightface's [-1, 1] pixels
            "std": (0.5, 0.5, 0.5),
            "first_conv": "layers.0.layers.0",
            "classifier": "classifier",
            "license": "mit",
            "paper_ids": "arXiv:1804.07573",
        }
    }
)


@register_model
def mobilefacenet(pretrained: bool = False, **kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet as insightface's ``mbf``: blocks (1, 4, 6, 2), scale 2, 512-d embeddings."""
    return build_model_with_cfg(
        MobileFaceNet,
        "mobilefacenet",
        pretrained,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
        **kwargs,
    )
