"""The in-memory image dataset: one uint8 tensor, served a whole batch per index operation.

Its own module, below :mod:`headreg.data._datasets` (which names and loads the datasets) and the
generators such as :mod:`headreg.data._fake`, so that both can build one without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from headreg.errors import InvalidValueError

__all__ = ["TensorImageDataset"]


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor, served a whole batch at a time.

    Indexing with a tensor (or list) of indices gathers the batch in one operation: no per-sample PIL decoding
    and no per-sample collate, which is what makes MNIST-sized training loops fast.

    Args:
        images: ``(N, C, H, W)`` uint8 pixels in [0, 255].
        labels: ``(N,)`` integer class indices in ``[0, num_classes)``.
        classes: Class names, one per class; ``None`` names them ``"0"``, ``"1"``, ...
        num_classes: Number of classes; defaults to ``len(classes)`` or ``labels.max() + 1``.
        name: Dataset name, for messages.
        hflip: Whether a horizontal flip is a label-preserving augmentation (not for digits).

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        targets: ``(N,)`` int64 labels (``labels`` is an alias).
        channels: ``C``.
        image_size: Native ``(H, W)`` in pixels.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        name: str = "tensor",
        hflip: bool = False,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images)
            raise InvalidValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got {got}")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise InvalidValueError(
                f"labels must be an integer tensor of shape ({images.shape[0]},), "
                f"got {tuple(labels.shape)} {labels.dtype}"
            )
        if images.shape[0] == 0:
            raise InvalidValueError(f"dataset '{name}' is empty: images has shape {tuple(images.shape)}")
        self.images = images.contiguous()
        self.targets = labels.to(torch.long).contiguous()
        if num_classes is None:
            num_classes = len(classes) if classes is not None else int(self.targets.max()) + 1
        self.num_classes = int(num_classes)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        if int(self.targets.min()) < 0 or int(self.targets.max()) >= self.num_classes:
            raise InvalidValueError(
                f"labels must lie in [0, {self.num_classes}), got range "
                f"[{int(self.targets.min())}, {int(self.targets.max())}]"
            )
        self.name = name
        self.hflip = hflip

    @property
    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 labels (same tensor as ``targets``)."""
        return self.targets

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample ``((C, H, W) uint8, () int64)`` for an int, a batch for a tensor or list of indices."""
        if isinstance(index, int) or (hasattr(index, "ndim") and index.ndim == 0):  # also numpy / 0-d tensor
            return self.images[int(index)], self.targets[int(index)]
        return self.get_batch(index)

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch: ``(B, C, H, W)`` uint8 images and ``(B,)`` int64 labels.

        A ``torch.utils.data.DataLoader`` over this dataset needs ``collate_fn=TensorImageDataset.collate``,
        because this already returns a collated batch.
        """
        return self.get_batch(indices)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``(B, C, H, W)`` uint8 images and ``(B,)`` int64 labels for ``indices`` in one index op."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return self.images.index_select(0, idx), self.targets.index_select(0, idx)

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass-through collate for DataLoaders that call ``__getitems__``."""
        return batch

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """Move images and labels to ``device`` in place (e.g. the whole of MNIST onto the GPU) and return self."""
        self.images = self.images.to(device)
        self.targets = self.targets.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(name={self.name!r}, samples={len(self)}, classes={self.num_classes}, "
            f"channels={self.channels}, image_size={self.image_size})"
        )
