"""IResNet, the face-recognition ResNets of ArcFace (Deng et al. 2019) as insightface trains them.

Registered into timm as ``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100`` and ``iresnet200``,
so ``timm.create_model("iresnet50")`` works once ``headreg.models`` is imported. The architecture is
insightface's ``recognition/arcface_torch/backbones/iresnet.py``, re-stated in timm's conventions:

- ``forward_features``: ``(B, 3, 112, 112) -> (B, 512, 7, 7)``: a stride-1 3×3 stem, four stages of
  pre-activation basic blocks (BN → conv → BN → PReLU → strided conv → BN, plus the shortcut), each
  halving the resolution, and a final BN on the map.
- ``forward_head(x, pre_logits=True)``: insightface's "features" tail, flatten → dropout → linear →
  BN, giving ``(B, 512)`` embeddings. That tail belongs to the backbone, so ``num_features`` is 512.
- ``num_classes > 0`` adds a linear ``classifier`` on the embedding (timm's convention).

Parameter names differ from insightface's (``stem``/``stages``/``norm``/``embed`` instead of
``conv1``/``layer1``/``bn2``/``fc``/``features``): :func:`checkpoint_filter_fn` renames a published
``backbone.pth`` state dict, and ``headreg.create_model(..., pretrained_file=PATH)`` applies it.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..errors import InvalidValueError
from ._face import FaceClassifierMixin, FixedScaleBatchNorm1d, pop_factory_kwargs

__all__ = ["IResNet", "IBasicBlock", "checkpoint_filter_fn"]


class IBasicBlock(nn.Module):
    """Pre-activation basic block: ``BN → 3×3 conv → BN → PReLU → 3×3 conv (stride) → BN`` plus the shortcut.

    The stride sits on the second convolution, as in insightface (its ``IBasicBlock``).

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the second convolution (and of the shortcut's 1×1 convolution).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs, eps=1e-5)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=1e-5)
        self.prelu = nn.PReLU(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=1e-5)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs, eps=1e-5)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_chs, H, W) -> (B, out_chs, H / stride, W / stride)``."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + self.downsample(x)


class _Stem(nn.Module):
    """3×3 stride-1 convolution → BN → PReLU (the resolution is kept: faces are only 112×112)."""

    def __init__(self, in_chans: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=1e-5)
        self.act = nn.PReLU(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _Embed(nn.Module):
    """insightface's "features" tail: flatten → dropout → linear → BN, ``(B, C, h, w) -> (B, num_features)``."""

    def __init__(self, in_features: int, num_features: int, drop_rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_features)
        # insightface fixes this BN's scale at 1 (it only centres and shifts the embedding); kept so that
        # training from its recipe, and its published weights, behave the same.
        self.bn = FixedScaleBatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        # The tail runs in its own dtype (float32) even when the body ran in fp16 (insightface's fp16 option).
        return self.bn(self.fc(self.drop(torch.flatten(x, 1).to(self.fc.weight.dtype))))


class IResNet(FaceClassifierMixin, nn.Module):
    """IResNet for 112×112 faces, with insightface's 512-d embedding tail; see the module docstring.

    Args:
        layers: blocks per stage (``[3, 4, 14, 3]`` for IResNet-50).
        in_chans: input channels.
        num_classes: classes of a linear classifier on the embedding; 0 for an embedding extractor.
        num_features: embedding width (512 in insightface).
        drop_rate: dropout before the embedding's linear layer (insightface's ``dropout``).
        input_size: ``(H, W)`` the flattened feature size is computed for (``(112, 112)``).
        fp16: run the body (stem, stages, final BN) under CUDA fp16 autocast and the embedding tail in
            float32, as insightface's ``fp16=True``; no effect on CPU.
        zero_init_residual: zero the last BN of each block so blocks start as identities (the default, as timm's
            ``zero_init_last``). ``False`` is insightface's own initialisation; its randomly initialised
            ``iresnet100`` and ``iresnet200`` overflow float32 in eval mode (docs/backbones.md). Loaded or trained
            weights are unaffected either way.
        global_pool: ``""`` leaves out the embedding tail, so ``forward`` returns the ``(B, 512, 7, 7)``
            map (timm's "no pooling"); any other value keeps it.
    """

    __jit_unused_properties__ = ["embedding_layer"]

    def __init__(
        self,
        layers: Sequence[int],
        in_chans: int = 3,
        num_classes: int = 0,
        num_features: int = 512,
        drop_rate: float = 0.0,
        input_size: Sequence[int] = (112, 112),
        fp16: bool = False,
        global_pool: str = "embed",
        zero_init_residual: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        factory = pop_factory_kwargs("IResNet", kwargs)
        widths = (64, 128, 256, 512)
        if len(layers) != len(widths):
            raise InvalidValueError(f"layers must give the blocks of 4 stages, got {tuple(layers)!r}")
        self.in_chans, self.num_classes, self.fp16 = in_chans, num_classes, bool(fp16)
        self.global_pool = global_pool  # "" skips the embedding tail (timm's unpooled output)
        self.num_features = self.head_hidden_size = num_features
        self.stem = _Stem(in_chans, widths[0])
        stages: list[nn.Module] = []
        prev = widths[0]
        self.feature_info = []  # no annotation: TorchScript would warn about it
        for i, (width, depth) in enumerate(zip(widths, layers, strict=True)):
            blocks = [IBasicBlock(prev if j == 0 else width, width, 2 if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            prev = width
            self.feature_info.append({"num_chs": width, "reduction": 2 ** (i + 1), "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(prev, eps=1e-5)
        h, w = (s // 2 ** len(widths) for s in input_size)
        self.pool_size = (h, w)
        self.embed = _Embed(prev * h * w, num_features, drop_rate)
        self.classifier: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)  # insightface's initialisation
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)
        if factory:  # timm's device= / dtype= (its tests build every model on the meta device)
            self.to(**factory)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, 112, 112) -> (B, 512, 7, 7)`` (fp16 on CUDA with ``fp16=True``)."""
        if self.fp16:
            return self._body_fp16(x)
        return self._body(x)

    def _body(self, x: Tensor) -> Tensor:
        return self.norm(self.stages(self.stem(x)))

    @torch.jit.unused
    def _body_fp16(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            return self._body(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature maps → ``(B, num_features)`` float32 embeddings (``pre_logits``) or class logits."""
        if self.global_pool == "":
            return x
        x = self.embed(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def embedding_layer(self) -> nn.Module:
        """The linear layer that outputs the embedding (``--head-lr-scale`` speeds it up with the head)."""
        return self.embed.fc


#: insightface's parameter-name prefixes → headreg's (the blocks' own names are the same).
_RENAMES = (
    (re.compile(r"^conv1\."), "stem.conv."),
    (re.compile(r"^bn1\."), "stem.bn."),
    (re.compile(r"^prelu\."), "stem.act."),
    (re.compile(r"^bn2\."), "norm."),
    (re.compile(r"^fc\."), "embed.fc."),
    (re.compile(r"^features\."), "embed.bn."),
)
_LAYER = re.compile(r"^layer([1-4])\.")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Rename an insightface IResNet state dict (``backbone.pth``) to :class:`IResNet`'s names.

    A state dict already in headreg's names passes unchanged (timm's ``pretrained_filter_fn`` signature).

    Args:
        state_dict: ``name -> tensor``, insightface's names (``conv1.weight``, ``layer3.13.bn1.bias``,
            ``fc.weight``, ``features.running_mean``...) or headreg's.
        model: unused; timm passes the model being loaded.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _LAYER.sub(lambda m: f"stages.{int(m.group(1)) - 1}.", key)
        for pattern, repl in _RENAMES:
            new = pattern.sub(repl, new)
        out[new] = value
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # insightface's data: aligned 112×112 faces, pixels mapped to [-1, 1] ((x / 255 - 0.5) / 0.5).
    return {
        "num_classes": 0,
        "input_size": (3, 112, 112),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv",
        "classifier": "classifier",
        "license": "mit",
        "paper_ids": "arXiv:1801.07698",
        **kwargs,
    }


#: blocks per stage, as insightface's ``iresnet.py``.
_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in _LAYERS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> IResNet:
    return build_model_with_cfg(
        IResNet,
        variant,
        pretrained,
        layers=_LAYERS[variant],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
        **kwargs,
    )


@register_model
def iresnet18(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-18: 2, 2, 2, 2 blocks; 512-d embeddings of 112×112 faces."""
    return _create("iresnet18", pretrained, **kwargs)


@register_model
def iresnet34(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-34: 3, 4, 6, 3 blocks; 512-d embeddings of 112×112 faces."""
    return _create("iresnet34", pretrained, **kwargs)


@register_model
def iresnet50(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-50: 3, 4, 14, 3 blocks; 512-d embeddings of 112×112 faces."""
    return _create("iresnet50", pretrained, **kwargs)


@register_model
def iresnet100(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-100: 3, 13, 30, 3 blocks; 512-d embeddings of 112×112 faces."""
    return _create("iresnet100", pretrained, **kwargs)


@register_model
def iresnet200(pretrained: bool = False, **kwargs: Any) -> IResNet:
    """IResNet-200: 6, 26, 60, 6 blocks; 512-d embeddings of 112×112 faces."""
    return _create("iresnet200", pretrained, **kwargs)
