"""Transforms resolved from a backbone's data config: batched on the device for in-memory data, timm's per sample
for image folders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headreg.data._files import ImageFilesDataset, ImageListDataset
from headreg.data._recordio import RecordDataset
from headreg.data._tensor import TensorImageDataset
from headreg.errors import InvalidInputError, InvalidValueError

__all__ = ["FACE_INPUT", "BatchTransform", "face_data_config", "resolve_transform"]

#: The input of face recognition backbones (insightface's): 112x112 RGB, pixels mapped to [-1, 1].
FACE_INPUT = {"input_size": (3, 112, 112), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# ITU-R BT.601 luma weights, as PIL's convert("L") and torchvision's rgb_to_grayscale use.
_LUMA = (0.299, 0.587, 0.114)


def _as_size(value: int | Sequence[int] | None, what: str) -> tuple[int, int] | None:
    """``H`` / ``(H, W)`` / ``(C, H, W)`` -> ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) in (2, 3):
        size = tuple(int(v) for v in value[-2:])
    else:
        raise InvalidValueError(f"{what} must be an int, (H, W) or (C, H, W), got {value!r}")
    if min(size) < 1:
        raise InvalidValueError(f"{what} must be positive, got {value!r}")
    return size  # type: ignore[return-value]


def _stats_for(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """Fit a per-channel mean/std to ``channels``: a single value repeats; RGB stats collapse to luma for grey."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        # timm keeps a pretrained RGB mean/std for in_chans=1 models; weigh it as the luminance conversion does.
        return (sum(w * v for w, v in zip(_LUMA, values, strict=True)),)
    raise InvalidValueError(f"{what} must have 1 or {channels} values for {channels} channels, got {values}")


class BatchTransform(nn.Module):
    """Turn a whole batch of uint8 images into normalised model input, on whatever device the batch is on.

    Steps, in order: uint8 -> float in [0, 1]; when training, optional random translation (zero padding plus a
    random crop back to size) and horizontal flip; channel adaptation (1 -> 3 by repetition, 3 -> 1 by BT.601
    luminance); resize to ``size`` (bilinear, antialiased) if it differs; ``(x - mean) / std``.

    Float input is taken as already transformed (e.g. by a per-sample transform in DataLoader workers) and passed
    through unchanged, so a training loop can call the transform on every batch regardless of the dataset.

    Args:
        mean: Per-channel mean of the model input, for pixels in [0, 1] (1 value or ``in_chans`` values).
        std: Per-channel standard deviation, same convention.
        in_chans: Channels the model expects.
        size: ``(H, W)`` the model expects; ``None`` keeps the batch's size.
        translate: Maximum random shift in pixels (at the native size) when training; 0 disables it.
        hflip: Probability of a horizontal flip when training.
        seed: Seed of the augmentation's ``torch.Generator`` (CPU; the draws are tiny and moved to the device).

    Example:
        >>> t = BatchTransform(mean=(0.1307,), std=(0.3081,), in_chans=1)
        >>> x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
        >>> round(float(t(x)[0, 0, 0, 0]), 4)
        2.8215
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        in_chans: int,
        size: int | Sequence[int] | None = None,
        translate: int = 0,
        hflip: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise InvalidValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        mean_t = _stats_for(mean, in_chans, "mean")
        std_t = _stats_for(std, in_chans, "std")
        if min(std_t) <= 0:
            raise InvalidValueError(f"std must be positive, got {std_t}")
        if isinstance(translate, bool) or not isinstance(translate, int) or translate < 0:
            raise InvalidValueError(f"translate must be an integer >= 0 (pixels), got {translate!r}")
        if not 0.0 <= float(hflip) <= 1.0:
            raise InvalidValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.in_chans = in_chans
        self.size = _as_size(size, "size")
        self.translate = translate
        self.hflip = float(hflip)
        # Buffers so .to(device) moves them; non-persistent so they never land in a checkpoint.
        self.register_buffer("mean", torch.tensor(mean_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_t).view(1, -1, 1, 1), persistent=False)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def augments(self) -> bool:
        return self.training and (self.translate > 0 or self.hflip > 0)

    def forward(self, images: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        """Transform a batch.

        Args:
            images: ``(B, C, H, W)`` uint8 in [0, 255], any device. Float input passes through unchanged.
            memory_format: layout of the result (e.g. ``torch.channels_last``); None: the input's.
                Written directly in that layout, which saves a separate copy.

        Returns:
            ``(B, in_chans, *size)`` float32, normalised; a new tensor (the input is never modified).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidInputError(f"images must be a (B, C, H, W) tensor, got {got}")
        if images.is_floating_point():
            return images if memory_format is None else images.contiguous(memory_format=memory_format)
        if images.dtype != torch.uint8:
            raise InvalidInputError(
                f"images must be uint8 in [0, 255] or already-transformed float, got {images.dtype}"
            )
        needs_resize = self.size is not None and tuple(images.shape[-2:]) != self.size
        if not self.augments and not needs_resize and images.shape[1] == self.in_chans:
            # The common evaluation case in two passes (convert, one fused multiply-add), with /255
            # folded into the scale; the output keeps the input's memory format (channels_last
            # stays channels_last, so a uint8 batch can be made channels_last before, cheaply).
            scale = (1.0 / (255.0 * self.std)).to(device=images.device)
            shift = (-self.mean / self.std).to(device=images.device)
            if memory_format is None:
                return torch.addcmul(shift, images.to(torch.float32), scale)
            out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
            return torch.addcmul(shift, images.to(torch.float32), scale, out=out)
        x = images.to(torch.float32).div_(255.0)
        if self.augments:
            x = self._augment(x)
        if x.shape[1] != self.in_chans and x.shape[1] == 3 and self.in_chans == 1:
            x = self._luma(x)  # before the resize: a third of the pixels to resize
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise InvalidInputError(
                    f"images have {x.shape[1]} channels; the model expects {self.in_chans} and only 1 -> N and "
                    "3 -> 1 are converted"
                )
            x = x.expand(-1, self.in_chans, -1, -1)  # after the resize: resize one channel, not three
        mean = self.mean.to(device=x.device)
        std = self.std.to(device=x.device)
        x = torch.addcmul(-mean / std, x, 1.0 / std)
        return x if memory_format is None else x.contiguous(memory_format=memory_format)

    def _luma(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.translate > 0:
            p = self.translate
            wp = w + 2 * p
            padded = F.pad(x, (p, p, p, p))  # zero = black, like torchvision's RandomCrop(padding=p)
            off = torch.randint(0, 2 * p + 1, (2, b, 1, 1), generator=self.generator).to(x.device)
            rows = off[0] + torch.arange(h, device=x.device).view(1, h, 1)
            cols = off[1] + torch.arange(w, device=x.device).view(1, 1, w)
            # One flat gather crops every sample at its own offset: faster than 4-way advanced indexing
            # (docs/train.md, "Speed").
            flat = (rows * wp + cols).view(b, 1, h * w).expand(b, c, h * w)
            x = padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)
        if self.hflip > 0:
            flip = (torch.rand(b, generator=self.generator) < self.hflip).to(x.device).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return x

    def extra_repr(self) -> str:
        return (
            f"in_chans={self.in_chans}, size={self.size}, mean={tuple(self.mean.flatten().tolist())}, "
            f"std={tuple(self.std.flatten().tolist())}, translate={self.translate}, hflip={self.hflip}"
        )


def face_data_config(data_config: dict[str, Any], declared: dict[str, Any] | None) -> dict[str, Any]:
    """The data config for a face protocol: :data:`FACE_INPUT`'s size, mean and std where the backbone names none.

    Args:
        data_config: ``timm.data.resolve_data_config(model=model)``, which fills ImageNet's values for what the
            model does not say.
        declared: The model's own ``pretrained_cfg`` (None or ``{}`` for a module that has none, such as
            insightface's ``get_model`` backbones); its keys win.

    Returns:
        A new dict.
    """
    declared = declared or {}
    return {**data_config, **{k: v for k, v in FACE_INPUT.items() if not declared.get(k)}}


def resolve_transform(
    data_config: dict[str, Any],
    dataset: Any,
    *,
    train: bool,
    input_size: int | Sequence[int] | None = None,
    augment: bool = True,
    seed: int = 0,
) -> BatchTransform:
    """Build the transform a backbone wants for ``dataset``.

    For an in-memory :class:`~headreg.data.TensorImageDataset` the result converts whole batches on the device;
    channels, mean and std come from ``data_config`` but the image size defaults to the dataset's **native** size,
    not the config's (usually 224): resizing 28-px MNIST to 224 px costs 64x the pixels per image for no gain on
    a backbone that pools globally. Pass ``input_size`` for backbones that need a fixed size (e.g. ViTs). A dataset
    of photos of their own size (``photos`` true: ``lfw:DIR``, ``pairs:LIST.csv``) defaults to the config's size.
    Training adds a random translation of 1/8 of the image side and, where it is label-preserving (not digits),
    horizontal flips.

    Aligned face crops read per sample (``aligned`` true: ``ijbb:DIR``, ``ijbc:DIR``) arrive as uint8 batches at
    their aligned size (112x112), which is kept unless ``input_size`` says otherwise, as for a ``.bin``.

    For an :class:`~headreg.data.ImageFolderDataset` (any :class:`~headreg.data.ImageFilesDataset`) images are
    decoded per sample in DataLoader workers, so
    timm's ``create_transform(**data_config, is_training=train)`` is installed as ``dataset.transform`` (with a
    grey conversion first when the model takes 1 channel) and the returned batch transform passes the
    already-normalised float batches through. A retrieval benchmark (:class:`~headreg.data.ImageListDataset`) uses
    its protocol's transform: resize to 256 and centre-crop 224 (``input_size`` sets the crop, the resize keeps
    the 0.875 ratio), the backbone's mean and std; training takes a random-resized crop and a flip.
    Either way the loop does ``model(transform(images.to(device)))``.

    Args:
        data_config: ``timm.data.resolve_data_config(model=model)``: ``input_size`` ``(C, H, W)``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``, ...
        dataset: A dataset from :func:`~headreg.data.create_dataset`.
        train: Training (augmentation on) or evaluation.
        input_size: ``H``, ``(H, W)`` or ``(C, H, W)`` overriding the image size.
        augment: Set False to train without augmentation.
        seed: Seed of the batch augmentation.

    Returns:
        A :class:`BatchTransform` in train or eval mode to match ``train``.
    """
    if not isinstance(data_config, dict) or "input_size" not in data_config:
        raise InvalidValueError(
            f"data_config must be a dict with 'input_size', 'mean' and 'std' (timm.data.resolve_data_config), "
            f"got {data_config!r}"
        )
    in_chans = int(data_config["input_size"][0])
    mean = data_config.get("mean", (0.485, 0.456, 0.406))
    std = data_config.get("std", (0.229, 0.224, 0.225))
    size = _as_size(input_size, "input_size")

    if isinstance(dataset, TensorImageDataset):
        side = min(dataset.image_size)
        if size is None:
            # Photos decoded at their own size (lfw:DIR, pairs:LIST.csv) say so: they go in at the model's size.
            size = _as_size(data_config["input_size"], "input_size") if getattr(dataset, "photos", False) else None
        transform = BatchTransform(
            mean,
            std,
            in_chans=in_chans,
            size=size if size is not None else dataset.image_size,
            translate=max(1, side // 8) if (train and augment) else 0,
            hflip=0.5 if (train and augment and dataset.hflip) else 0.0,
            seed=seed,
        )
    elif getattr(dataset, "aligned", False):
        # Aligned face crops decoded per sample in DataLoader workers (ijbb:, ijbc:): uint8 batches at their
        # aligned size, like a .bin's, normalised on the device; --input-size resizes them.
        transform = BatchTransform(mean, std, in_chans=in_chans, size=size or dataset.image_size)
    elif isinstance(dataset, (ImageFilesDataset, RecordDataset)):
        config = dict(data_config)
        if isinstance(dataset, ImageListDataset):
            # A retrieval benchmark's protocol: resize 256 -> centre crop 224 whatever the backbone's own
            # crop, and random-resized-crop + flip (no colour jitter) to train.
            config["crop_pct"] = dataset.crop_pct
            config["color_jitter"] = None
            size = size if size is not None else (dataset.input_size, dataset.input_size)
        dataset.transform = _sample_transform(config, in_chans, size, train=train and augment)
        transform = BatchTransform(mean, std, in_chans=in_chans, size=None)
    else:
        raise InvalidValueError(f"dataset must come from headreg.data.create_dataset, got {type(dataset).__name__}")
    return transform.train(train)


def _sample_transform(
    data_config: dict[str, Any], in_chans: int, size: tuple[int, int] | None, *, train: bool
) -> Callable[[Any], torch.Tensor]:
    from timm.data import create_transform
    from torchvision import transforms as T

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "color_jitter")
    config = {k: data_config[k] for k in keys if k in data_config}
    if size is not None:
        config["input_size"] = (in_chans, *size)
    config["mean"] = _stats_for(config.get("mean", (0.485, 0.456, 0.406)), in_chans, "mean")
    config["std"] = _stats_for(config.get("std", (0.229, 0.224, 0.225)), in_chans, "std")
    tf = create_transform(**config, is_training=train)
    if in_chans == 1:
        return T.Compose([T.Grayscale(num_output_channels=1), tf])
    if in_chans != 3:
        raise InvalidValueError(f"image folders are read as RGB; a model with in_chans={in_chans} cannot take them")
    return tf
