"""Named datasets: where they live on disk, how they load, and the in-memory layout the hot loop reads.

MNIST-sized datasets (mnist, fashion-mnist, cifar10, cifar100, fake) are decoded once into a uint8
tensor ``N x C x H x W`` and served a whole batch per index operation (:class:`TensorImageDataset`);
image folders stay on disk and go through a per-sample transform in DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headreg.data._files import ImageFilesDataset, ImageListDataset
from headreg.data._tensor import TensorImageDataset
from headreg.errors import DatasetNotFoundError, InvalidValueError, UnknownDatasetError, did_you_mean

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "ImageFilesDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "TensorImageDataset",
    "create_dataset",
    "is_pairs_dataset",
    "list_datasets",
    "resolve_data_dir",
]

DATA_DIR_ENV = "HEADREG_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/headreg/data")

SPLITS = ("train", "test")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the root folder that holds the datasets.

    Resolution order: ``data_dir`` if given, else the environment variable ``HEADREG_DATA_DIR`` (when set and
    not empty), else ``~/.cache/headreg/data``. The folder is not created and need not exist.

    Args:
        data_dir: Explicit root, e.g. from ``--data-dir``.

    Returns:
        The root as an absolute, user-expanded path.
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser().resolve()


def _data_dir_source(data_dir: str | Path | None) -> str:
    if data_dir is not None and str(data_dir) != "":
        return "from the data_dir argument"
    if os.environ.get(DATA_DIR_ENV):
        return f"from {DATA_DIR_ENV}"
    return f"the default; {DATA_DIR_ENV} is not set"


class ImageFolderDataset(ImageFilesDataset):
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) decoded per sample, with headreg's attributes.

    ``transform`` is a per-sample callable (PIL image -> tensor); :func:`headreg.data.resolve_transform` sets it
    from the backbone's data config. Without one, samples are ``(3, H, W)`` uint8 tensors.

    Attributes:
        root: The folder the classes were read from.
        targets: ``(N,)`` int64 labels (``labels`` is an alias).
        channels: 3 (images are converted to RGB on load).
        image_size: ``None``: images in a folder have no single native size.
    """

    def __init__(self, root: Path, *, name: str, transform: Callable[[Any], Any] | None = None) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self._folder = ImageFolder(str(root))
        except FileNotFoundError as err:
            raise DatasetNotFoundError(
                f"dataset '{name}': no images found in {root} ({err}); expected the ImageFolder layout "
                f"{root}/<class name>/<image file>"
            ) from None
        self.root = root
        self.name = name
        self.classes = list(self._folder.classes)
        self.targets = torch.tensor(self._folder.targets, dtype=torch.long)
        self.transform = transform

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, class index)`` pairs, as ImageFolder's."""
        return self._folder.samples

    def _load(self, path: str) -> Any:
        return self._folder.loader(path)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, samples={len(self)}, classes={self.num_classes})"


# name -> (torchvision class name, folder under the data dir holding its files, hflip is label-preserving)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", False),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", True),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", True),
    "cifar100": ("CIFAR100", "cifar-100-python", True),
}
_PREFIXED = ("imagefolder", "rec")
#: Names that take a path and give a pairs protocol (:mod:`headreg.data._pairs`), with the form of their argument.
_PAIRS = {
    "bin": ("file", "bin:PATH/lfw.bin"),
    "lfw": ("folder", "lfw:DIR"),
    "pairs": ("file", "pairs:LIST.csv"),
    "ijbb": ("folder", "ijbb:DIR"),  # IJB template pairs (headreg.data._ijb)
    "ijbc": ("folder", "ijbc:DIR"),
}
_OTHER = ("fake",)
#: The metric-learning retrieval benchmarks (:mod:`headreg.data._retrieval_sets`): a name under the data dir, or
#: ``NAME:DIR`` for a folder elsewhere; ``csv`` always takes its file.
_RETRIEVAL = ("cub200", "cars196", "sop", "inshop")


def is_pairs_dataset(name: str) -> bool:
    """Whether ``name`` gives an evaluation pairs protocol (``bin:``, ``lfw:``, ``pairs:``, ``ijbb:``, ``ijbc:``)
    rather than classes."""
    return isinstance(name, str) and name.partition(":")[0].strip().lower() in _PAIRS


def list_datasets() -> list[str]:
    """Names :func:`create_dataset` accepts; ``imagefolder``, ``rec``, ``bin``, ``lfw``, ``pairs``, ``ijbb``, ``ijbc``
    and ``csv`` take a path, ``cub200``, ``cars196``, ``sop`` and ``inshop`` may (``NAME:DIR``)."""
    return sorted([*_TORCHVISION, *_OTHER, *_PREFIXED, *_PAIRS, *_RETRIEVAL, "csv"])


def create_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    **kwargs: Any,
) -> TensorImageDataset | ImageFilesDataset:
    """Create a named dataset.

    Args:
        name: ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (torchvision's layouts under the data dir),
            ``imagefolder:PATH`` (torchvision's ImageFolder layout; ``PATH/<split>`` if that folder exists, else
            ``PATH`` itself; a relative PATH is taken from the current directory), ``rec:DIR`` (insightface's
            MXNet RecordIO ``DIR/<split>.rec`` + ``.idx``, read without mxnet: :mod:`headreg.data._recordio`;
            ``test`` falls back to ``train.rec``), ``bin:PATH`` (an insightface
            validation ``.bin`` such as ``lfw.bin``: a :class:`~headreg.data._pairs.PairsDataset` of face pairs,
            the same for every split), ``lfw:DIR`` (LFW's ``DIR/pairs.txt`` over ``DIR/lfw/``, likewise),
            ``pairs:LIST.csv`` (a CSV ``path1,path2,issame``, likewise), ``ijbb:DIR`` / ``ijbc:DIR``
            (insightface's IJB layout: an :class:`~headreg.data._ijb.IJBDataset` of template pairs), the retrieval
            benchmarks ``cub200``, ``cars196``, ``sop``, ``inshop`` in their native layouts under the data dir
            (``NAME:DIR``: in DIR) and ``csv:PATH`` (open-metric-learning's CSV), each an :class:`ImageListDataset`
            of the split's unseen classes (docs/protocols.md), or ``fake`` (seeded synthetic
            images with learnable class structure, options ``num_classes``, ``num_samples``, ``image_size``,
            ``channels``, ``seed``).
        split: ``train`` or ``test`` (any subfolder name for ``imagefolder``).
        data_dir: Root holding the datasets; see :func:`resolve_data_dir`.
        download: Let torchvision download a missing dataset. Never done otherwise.
        **kwargs: Options of the ``fake`` dataset; other datasets take none.

    Returns:
        A :class:`TensorImageDataset` for the in-memory datasets, an :class:`ImageFolderDataset` for folders, an
        :class:`ImageListDataset` for the retrieval benchmarks.

    Raises:
        UnknownDatasetError: ``name`` is not a known dataset.
        InvalidValueError: a bad split or option.
        DatasetNotFoundError: the files are not where they were looked for, or the split holds no images.
    """
    if not isinstance(name, str) or not name:
        raise InvalidValueError(f"dataset name must be a non-empty string, got {name!r}")
    key, _, arg = name.partition(":")
    key = key.strip().lower()
    if key in _PREFIXED:
        if not arg:
            raise InvalidValueError(f"dataset '{name}' needs a folder: use '{key}:PATH'")
        _reject_options(name, kwargs)
        if key == "rec":
            from headreg.data._recordio import create_record_dataset

            return create_record_dataset(name, Path(arg).expanduser(), split)
        return _create_imagefolder(name, Path(arg).expanduser(), split)
    if key in _PAIRS:
        if not arg:
            raise InvalidValueError(f"dataset '{name}' needs a {_PAIRS[key][0]}: use '{_PAIRS[key][1]}'")
        _check_split(name, split)
        _reject_options(name, kwargs)
        return _create_pairs(key, Path(arg).expanduser(), name)
    if key == "csv" and not arg:
        raise InvalidValueError(f"dataset '{name}' needs a file: use 'csv:PATH' (columns label,path[,split,...])")
    if key in _RETRIEVAL or key == "csv":
        _check_split(name, split)
        _reject_options(name, kwargs)
        from headreg.data._retrieval_sets import read_retrieval_set

        folder = Path(arg) if arg else None
        return read_retrieval_set(key, split, folder, resolve_data_dir(data_dir), _data_dir_source(data_dir))
    if key in _TORCHVISION and not arg:
        _check_split(name, split)
        _reject_options(name, kwargs)
        return _create_torchvision(key, split, data_dir=data_dir, download=download)
    if key == "fake" and not arg:
        _check_split(name, split)
        from headreg.data._fake import create_fake

        return create_fake(split, **kwargs)
    raise UnknownDatasetError(
        f"unknown dataset '{name}'{did_you_mean(key, list_datasets())} (known: {', '.join(list_datasets())}; "
        "imagefolder is used as 'imagefolder:PATH', rec as 'rec:DIR', bin as 'bin:PATH', lfw as 'lfw:DIR', "
        "pairs as 'pairs:LIST.csv', ijbb and ijbc as 'ijbb:DIR', 'ijbc:DIR', csv as 'csv:PATH')"
    )


def _create_pairs(key: str, path: Path, name: str) -> Any:
    from headreg.data._pairs import PairsDataset

    if key in ("ijbb", "ijbc"):
        from headreg.data._ijb import IJBDataset

        return IJBDataset(path, key, name=name)

    if key == "bin":
        return PairsDataset.from_bin(path, name=name)
    from headreg.data._pair_lists import read_lfw_pairs, read_pairs_csv

    paths, issame = read_lfw_pairs(path) if key == "lfw" else read_pairs_csv(path)
    return PairsDataset.from_files(paths, issame, name=name)


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise InvalidValueError(f"split for dataset '{name}' must be one of {', '.join(SPLITS)}, got {split!r}")


def _reject_options(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise InvalidValueError(f"dataset '{name}' takes no options, got {', '.join(sorted(kwargs))}")


def _create_torchvision(key: str, split: str, *, data_dir: str | Path | None, download: bool) -> TensorImageDataset:
    import torchvision.datasets as tvd

    cls_name, subdir, hflip = _TORCHVISION[key]
    root = resolve_data_dir(data_dir)
    where = root / subdir

    def not_found(detail: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"dataset '{key}' ({split} split) not found: looked in {where} (data dir {root}, "
            f"{_data_dir_source(data_dir)}){detail}. Point headreg at a folder that holds it with --data-dir DIR "
            f"or {DATA_DIR_ENV}=DIR, or download it once on a machine with internet, e.g. "
            f"`python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', train=True, download=True); "
            f"torchvision.datasets.{cls_name}('{root}', train=False, download=True)\"` "
            f"(or create_dataset(..., download=True)) and copy the {subdir.split('/')[0]}/ folder it makes into {root}"
        )

    if not download and not where.is_dir():
        raise not_found("")
    try:
        ds = getattr(tvd, cls_name)(str(root), train=(split == "train"), download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted" for missing or partial files
        raise not_found(f": {err}") from None
    except OSError as err:  # a failed download (no network) or unreadable files
        raise not_found(f": {type(err).__name__}: {err}") from None

    data = ds.data
    if isinstance(data, torch.Tensor):  # MNIST family: (N, H, W) uint8
        images = data.unsqueeze(1)
    else:  # CIFAR: numpy (N, H, W, C) uint8
        images = torch.from_numpy(data).permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return TensorImageDataset(images.contiguous(), labels, classes=list(ds.classes), name=key, hflip=hflip)


def _create_imagefolder(name: str, path: Path, split: str) -> ImageFolderDataset:
    path = path.resolve()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset '{name}' not found: {path} is not a folder; expected the ImageFolder layout "
            f"{path}/[<split>/]<class name>/<image file>"
        )
    root = path / split
    if not root.is_dir():
        # Falling back to PATH itself when it holds other splits would read 'train'/'test' as class names.
        present = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name in {"train", "test", "val"})
        if present:
            raise DatasetNotFoundError(
                f"split {split!r} of dataset '{name}' not found: {root} does not exist "
                f"(splits present: {', '.join(present)})"
            )
        root = path
    return ImageFolderDataset(root, name=name)
