"""Face-verification pairs: insightface's validation ``.bin`` files and stored pair embeddings.

An insightface ``.bin`` (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...) is a pickle of one 2-tuple
``(images, issame)``: ``images`` a list of ``2P`` encoded images (JPEG or PNG bytes of aligned 112x112 faces),
pair ``p`` being images ``2p`` and ``2p + 1``; ``issame`` a list of ``P`` bools. A pickle can run any code it
names, so the file is read by :class:`_RestrictedUnpickler`, which refuses every global: only the opcodes of
tuples, lists, bytes, str, bool and int (and other plain containers, which the structure check then refuses)
can be built, and a crafted file is a :class:`~headreg.errors.DataFileError`, never executed. The unpickled
structure is then checked as data (:func:`check_pairs_structure`) before anything is decoded.

Pair lists of image files (LFW's ``pairs.txt``, a CSV) are parsed by :mod:`headreg.data._pair_lists` and decoded
by :meth:`PairsDataset.from_files` into the same dataset.

A pair-embeddings file is a safetensors file with ``embeddings`` ``(2P, D)`` (pair members interleaved as in
the ``.bin`` order) and ``issame`` ``(P,)`` bool.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from headreg.data._tensor import TensorImageDataset
from headreg.errors import DataFileError, DatasetNotFoundError, InvalidValueError
from headreg.metrics.pairs import check_pairs

__all__ = [
    "PairsDataset",
    "check_pairs_structure",
    "has_issame",
    "load_pair_embeddings",
    "read_pairs_bin",
    "save_pair_embeddings",
]


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds no object through a global: no class, no function, no ``__reduce__`` call."""

    def find_class(self, module: str, name: str) -> Any:
        raise DataFileError(
            f"refusing to load the global {module}.{name}: a pairs .bin file holds only lists of image bytes "
            "and bools, so this file is not one (or was crafted to run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataFileError("refusing a persistent id: a pairs .bin file holds only lists of image bytes and bools")


def check_pairs_structure(obj: Any, where: str) -> tuple[list[bytes], list[bool]]:
    """Check the unpickled content of a ``.bin`` file as data: ``(2P image bytes, P bools)``, ``P >= 1``.

    Args:
        obj: What the restricted unpickler returned.
        where: The file, for the message.

    Returns:
        ``(images, issame)``.

    Raises:
        DataFileError: anything else, naming what is wrong and where.
    """
    if not isinstance(obj, tuple) or len(obj) != 2:
        got = f"a {len(obj)}-tuple" if isinstance(obj, tuple) else type(obj).__name__
        raise DataFileError(f"{where}: must hold a 2-tuple (images, issame), got {got}")
    images, issame = obj
    for key, value in (("images", images), ("issame", issame)):
        if not isinstance(value, list):
            raise DataFileError(f"{where}: {key} must be a list, got {type(value).__name__}")
    if not issame:
        raise DataFileError(f"{where}: issame is empty; the file holds no pair")
    if len(images) != 2 * len(issame):
        raise DataFileError(
            f"{where}: images must hold 2 x {len(issame)} = {2 * len(issame)} entries (two per pair), got {len(images)}"
        )
    bad = next((i for i, v in enumerate(issame) if not isinstance(v, bool)), None)
    if bad is not None:
        raise DataFileError(f"{where}: issame[{bad}] must be a bool, got {type(issame[bad]).__name__}")
    bad = next((i for i, v in enumerate(images) if not isinstance(v, bytes) or not v), None)
    if bad is not None:
        got = "empty bytes" if isinstance(images[bad], bytes) else type(images[bad]).__name__
        raise DataFileError(f"{where}: images[{bad}] must be the bytes of an encoded image, got {got}")
    return images, issame


def read_pairs_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """Read an insightface ``.bin`` with the restricted unpickler and check its structure.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(images, issame)``: ``2P`` encoded images and ``P`` bools.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DataFileError: not a pickle, a refused global, or a structure other than ``(2P bytes, P bools)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"pairs file not found: {path}; expected an insightface validation .bin such as lfw.bin "
            "(from the faces_emore / ms1m training archives, which ship them beside the .rec)"
        )
    data = path.read_bytes()
    try:
        # encoding="bytes": the files were written by Python 2, whose str (the JPEG bytes) must stay bytes.
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataFileError as err:
        raise DataFileError(f"{path}: {err}") from None
    except Exception as err:  # UnpicklingError, EOFError, ... for a truncated or foreign file
        raise DataFileError(f"{path} is not a readable pairs .bin (a pickle): {type(err).__name__}: {err}") from None
    return check_pairs_structure(obj, str(path))


def _decode(source: bytes | Path, what: str) -> torch.Tensor:
    """Decode one image (encoded bytes or a file) to ``(H, W, 3)`` uint8 RGB; ``what`` names it in the error."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataFileError(f"{what} cannot be decoded ({type(err).__name__}: {err})") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)


class PairsDataset(TensorImageDataset):
    """The ``2P`` images of a pairs protocol, decoded into memory, with the ``P`` same/different flags.

    Labels are the pair index (``i // 2``): they carry no identity and only keep the dataset API; the pairs
    protocol reads :attr:`issame`.

    Attributes:
        issame: ``(P,)`` bool, whether pair ``p`` (images ``2p`` and ``2p + 1``) shows one identity.
        photos: True for image files of any size (:meth:`from_files`): without ``--input-size`` they are resized
            to the backbone's input size, not kept at their native size as a ``.bin``'s aligned faces are.
        faces: True: a face protocol, whose input defaults to 112 px and mean/std 0.5 where the backbone names
            none (:func:`~headreg.data.transforms.face_data_config`).
        protocol: ``"pairs"``, which routes :func:`headreg.engine.evaluate.evaluate_model` to the pairs protocol.
    """

    protocol = "pairs"
    photos = False
    faces = True

    def __init__(self, images: torch.Tensor, issame: torch.Tensor, *, name: str) -> None:
        labels = torch.arange(images.shape[0]) // 2
        super().__init__(images, labels, name=name, hflip=True)
        self.issame = issame.bool()

    @classmethod
    def from_bin(cls, path: str | Path, *, name: str) -> PairsDataset:
        """Read, check and decode an insightface ``.bin`` (all images must share one size)."""
        blobs, issame = read_pairs_bin(path)
        first = _decode(blobs[0], f"{path}: images[0]")
        images = torch.empty((len(blobs), 3, *first.shape[:2]), dtype=torch.uint8)
        for i, blob in enumerate(blobs):
            img = first if i == 0 else _decode(blob, f"{path}: images[{i}]")
            if img.shape != first.shape:
                raise DataFileError(
                    f"{path}: images[{i}] is {img.shape[1]}x{img.shape[0]} pixels, images[0] "
                    f"{first.shape[1]}x{first.shape[0]}; a pairs .bin holds aligned faces of one size"
                )
            images[i] = img.permute(2, 0, 1)
        return cls(images, torch.tensor(issame, dtype=torch.bool), name=name)

    @classmethod
    def from_files(
        cls, paths: Sequence[Path], issame: Sequence[bool], *, name: str, progress: bool = True
    ) -> PairsDataset:
        """Decode the ``2P`` image files of a pair list (``lfw:DIR``, ``pairs:LIST.csv``) at their native size.

        A file named by several pairs (LFW's are) is decoded once. All images must share one size, as the
        batch transform resizes one ``(2P, 3, H, W)`` tensor (to the backbone's input size unless ``--input-size``
        says otherwise: :attr:`photos`); a delayed bar shows when decoding takes over 2 s.

        Args:
            paths: ``2P`` image files, pair ``p`` being ``paths[2p]`` and ``paths[2p + 1]``.
            issame: ``P`` bools.
            name: The dataset name, for messages.
            progress: Allow the bar (on rank 0 only).

        Raises:
            DataFileError: an image that cannot be decoded, or one whose size differs from the first's.
        """
        from headreg._runtime import dist_info
        from headreg.metrics._base import stage_bar

        if not issame or len(paths) != 2 * len(issame):
            raise InvalidValueError(
                f"a pair list needs 2 x P image paths for P >= 1 pairs, got {len(paths)} and P = {len(issame)}"
            )
        decoded: dict[Path, torch.Tensor] = {}
        images: torch.Tensor | None = None
        with stage_bar(f"decode {name}", len(paths), "img", progress and dist_info().rank == 0) as bar:
            for i, path in enumerate(paths):
                img = decoded.get(path)
                if img is None:
                    img = decoded[path] = _decode(path, f"dataset '{name}': the image {path}").permute(2, 0, 1)
                if images is None:
                    images = torch.empty((len(paths), *img.shape), dtype=torch.uint8)
                elif img.shape != images.shape[1:]:
                    raise DataFileError(
                        f"dataset '{name}': {path} is {img.shape[2]}x{img.shape[1]} pixels, {paths[0]} "
                        f"{images.shape[3]}x{images.shape[2]}; the images of a pair list must share one size "
                        "(resize them beforehand, e.g. to aligned 112x112 faces)"
                    )
                images[i] = img
                bar.update(1)
        # images was allocated at the first of the >= 2 paths.
        dataset = cls(images, torch.tensor(list(issame), dtype=torch.bool), name=name)
        dataset.photos = True
        return dataset


def has_issame(path: str | Path) -> bool:
    """Whether the safetensors file at ``path`` holds an ``issame`` tensor (a pair-embeddings file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return "issame" in set(f.keys())
    except Exception:  # not safetensors: load_embeddings reports it in its own words
        return False


def load_pair_embeddings(path: str | Path) -> dict[str, Any]:
    """Read a pair-embeddings file: ``embeddings`` ``(2P, D)`` float and ``issame`` ``(P,)`` bool.

    Returns:
        ``{"embeddings", "issame", "metadata"}``; the NaN / Inf scan is the evaluation's.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        InvalidInputError: not safetensors, a key missing, or shapes and dtypes that disagree.
    """
    from headreg.data.embeddings import read_tensors

    tensors, metadata = read_tensors(path, ("embeddings", "issame"), what="pair embeddings file")
    emb, issame = tensors["embeddings"], tensors["issame"]
    check_pairs(emb, issame, f"in {Path(path)}: ", finite=False)
    return {"embeddings": emb, "issame": issame, "metadata": metadata}


def save_pair_embeddings(
    path: str | Path, embeddings: torch.Tensor, issame: torch.Tensor, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``embeddings`` ``(2P, D)`` and ``issame`` ``(P,)`` bool to a safetensors file (parents created)."""
    from safetensors.torch import save_file

    check_pairs(embeddings, issame, finite=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": embeddings.detach().cpu().contiguous(), "issame": issame.detach().cpu().contiguous()}
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    return path
