"""A seeded synthetic image dataset that a model can actually learn: smooth class prototypes plus noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headreg.data._tensor import TensorImageDataset
from headreg.errors import InvalidValueError

__all__ = ["create_fake"]

_CHUNK = 4096  # samples generated per step, to bound the float32 scratch memory


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValueError(f"fake dataset option {name} must be a positive integer, got {value!r}")
    return value


def create_fake(
    split: str = "train",
    *,
    num_classes: int = 10,
    num_samples: int = 1000,
    image_size: int | tuple[int, int] = 28,
    channels: int = 1,
    seed: int = 0,
    noise: float = 40.0,
) -> TensorImageDataset:
    """Synthetic images whose class shows in a smooth pattern, seeded and reproducible.

    Each class gets a prototype: random 4x4 values per channel, upsampled bilinearly to the image size and
    stretched to [0, 255]. A sample is its class prototype times a random contrast in [0.7, 1.3] plus Gaussian
    pixel noise, clamped and rounded to uint8. Prototypes depend on ``seed`` only, so
    the train and test splits share classes; samples differ between splits.

    Args:
        split: ``train`` or ``test``.
        num_classes: Number of classes; labels are balanced (``i % num_classes``) and shuffled.
        num_samples: Number of images in the split.
        image_size: ``H`` (square) or ``(H, W)`` in pixels.
        channels: Channels per image (1 or 3 are typical).
        seed: Seed of prototypes and samples.
        noise: Standard deviation of the pixel noise, in uint8 grey levels.

    Returns:
        A :class:`TensorImageDataset` named ``fake`` with ``(num_samples, channels, H, W)`` uint8 images.
    """
    num_classes = _positive_int("num_classes", num_classes)
    num_samples = _positive_int("num_samples", num_samples)
    channels = _positive_int("channels", channels)
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (_positive_int("image_size", image_size),) * 2
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = (_positive_int("image_size[0]", image_size[0]), _positive_int("image_size[1]", image_size[1]))
    else:
        raise InvalidValueError(f"fake dataset option image_size must be an int or (H, W), got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidValueError(f"fake dataset option seed must be an integer, got {seed!r}")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise InvalidValueError(f"fake dataset option noise must be a number >= 0, got {noise!r}")

    proto_gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=proto_gen)
    protos = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    lo = protos.amin(dim=(1, 2, 3), keepdim=True)
    hi = protos.amax(dim=(1, 2, 3), keepdim=True)
    protos = (protos - lo) / (hi - lo).clamp_min(1e-6) * 255.0

    # A different stream per split: same classes, different samples.
    gen = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1) + 7919)
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    images = torch.empty(num_samples, channels, *size, dtype=torch.uint8)
    for start in range(0, num_samples, _CHUNK):
        lab = labels[start : start + _CHUNK]
        n = lab.shape[0]
        x = protos[lab] * torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
        x = x + noise * torch.randn(x.shape, generator=gen)
        images[start : start + n] = x.clamp_(0, 255).round_().to(torch.uint8)
    return TensorImageDataset(
        images, labels, classes=[f"class_{i}" for i in range(num_classes)], name="fake", hflip=False
    )
