"""Datasets of image files decoded one sample at a time, in DataLoader workers.

:class:`ImageFilesDataset` is what every file-backed dataset shares: a list of ``(path, label)`` samples, a
per-sample transform installed by :func:`headreg.data.resolve_transform`, and a decode error that names the file.
:class:`ImageListDataset` adds what the metric-learning retrieval benchmarks carry (``cub200``, ``cars196``,
``sop``, ``inshop``, ``csv:PATH``; read by :mod:`headreg.data._retrieval_sets`): query/gallery roles, categories,
the k of Recall@K their papers report, and whether the split's classes are unseen in training. Nothing is decoded
ahead: SOP's 120,053 images stay on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from headreg.errors import DataFileError

__all__ = ["ImageFilesDataset", "ImageListDataset"]


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What reading one image can raise, for a corrupt, truncated, vanished or hostile file.

    OSError (PIL's UnidentifiedImageError, a truncated file, a vanished one); for malformed files PIL also
    raises SyntaxError, ValueError, EOFError, and DecompressionBombError for a decompression bomb.
    """
    errors: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - torchvision's loader needs PIL anyway
        return errors
    return (*errors, Image.DecompressionBombError)


_DECODE_ERRORS = _decode_errors()


def _load_rgb(path: str) -> Any:
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


class ImageFilesDataset(Dataset):
    """Image files named by ``(path, label)`` samples, decoded per sample; subclasses fill the samples.

    ``transform`` is a per-sample callable (PIL image -> tensor); :func:`headreg.data.resolve_transform` sets it
    from the backbone's data config. Without one, samples are ``(3, H, W)`` uint8 tensors.

    Attributes:
        name: The dataset's name, for messages.
        targets: ``(N,)`` int64 labels (``labels`` is an alias).
        classes: Class names, index = label.
        channels: 3 (images are converted to RGB on load).
        image_size: ``None``: image files have no single native size.
    """

    channels = 3
    image_size = None
    name: str
    classes: list[str]
    targets: torch.Tensor
    transform: Callable[[Any], Any] | None

    @property
    def labels(self) -> torch.Tensor:
        return self.targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def samples(self) -> Sequence[tuple[str, int]]:
        """``(path, class index)`` pairs."""
        raise NotImplementedError

    def _load(self, path: str) -> Any:
        return _load_rgb(path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            image = self._load(path)
        except _DECODE_ERRORS as exc:  # PIL's errors name no file, or only in a DataLoader worker's traceback
            raise DataFileError(
                f"dataset '{self.name}': cannot read the image {path} ({type(exc).__name__}: {exc}); "
                "is it corrupt or truncated? Replace or remove it"
            ) from None
        if self.transform is not None:
            return self.transform(image), target
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image), target


class ImageListDataset(ImageFilesDataset):
    """One split of a retrieval benchmark: image files with labels and, optionally, query/gallery roles.

    Args:
        paths: Absolute image paths, one per sample.
        labels: ``(N,)`` labels in ``[0, len(classes))``.
        classes: Class names (the benchmark's own ids), index = label.
        name: The dataset's name, for messages.
        is_query: ``(N,)`` bool, the samples that query (In-shop's query images, a CSV's ``is_query``); None with
            ``is_gallery`` None: leave-one-out.
        is_gallery: ``(N,)`` bool, the samples searched.
        categories: One category name per sample (SOP's super-classes, a CSV's ``category``), for per-category
            metrics; None: none.
        recall_k: The k of Recall@K its papers report; None: the evaluation's default.
        unseen_classes: The split's classes are disjoint from the training split's (the metric-learning
            protocol): a head's top-1 accuracy means nothing there, so training reports retrieval instead.
        crop_pct: Evaluation resizes to ``size / crop_pct`` and centre-crops ``size`` (0.875: 256 -> 224).
        input_size: The side the benchmark's protocol feeds the model (224), unless ``--input-size`` says.

    Attributes:
        root: The folder the list was read from.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor,
        classes: Sequence[str],
        *,
        name: str,
        root: Path,
        is_query: torch.Tensor | None = None,
        is_gallery: torch.Tensor | None = None,
        categories: Sequence[str] | None = None,
        recall_k: tuple[int, ...] | None = None,
        unseen_classes: bool = True,
        crop_pct: float = 0.875,
        input_size: int = 224,
    ) -> None:
        self.name = name
        self.root = root
        self.paths = list(paths)
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(classes)
        self.is_query = is_query
        self.is_gallery = is_gallery
        self.categories = None if categories is None else list(categories)
        self.recall_k = None if recall_k is None else tuple(recall_k)
        self.unseen_classes = unseen_classes
        self.crop_pct = crop_pct
        self.input_size = input_size
        self.transform = None
        self._samples = list(zip(self.paths, self.targets.tolist(), strict=True))

    @property
    def samples(self) -> Sequence[tuple[str, int]]:
        return self._samples

    def __repr__(self) -> str:
        roles = "" if self.is_query is None else f", queries={int(self.is_query.sum())}"
        return f"ImageListDataset(name={self.name!r}, samples={len(self)}, classes={self.num_classes}{roles})"
