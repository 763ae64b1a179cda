"""IJB-B and IJB-C 1:1 verification from insightface's IJB layout (``--dataset ijbb:DIR``, ``ijbc:DIR``).

The layout is that of insightface's IJB evaluation (``recognition/arcface_torch/eval_ijbc.py``,
``recognition/_evaluation_/ijb/ijb_11.py``), for ``P`` = ``ijbb`` or ``ijbc``::

    DIR/meta/P_name_5pts_score.txt      one face a line: image x1 y1 x2 y2 ... x5 y5 detector_score
    DIR/meta/P_face_tid_mid.txt         one face a line, same order: image template_id media_id
    DIR/meta/P_template_pair_label.txt  one pair a line: template_id template_id label (1 same, 0 not)
    DIR/loose_crop/<image>              the loosely cropped photos the landmarks refer to

Fields are separated by single spaces. Every file is parsed strictly (``file:line`` in each error), the two
face lists must name the same images in the same order (insightface assumes it silently), and every template a
pair names must own a face. :class:`IJBDataset` then decodes and aligns one face per sample
(:func:`~headreg.data._align.align_face`), lazily in DataLoader workers: IJB-C's 469,375 aligned faces would
take 17.6 GB decoded, so they are never held in memory at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from headreg.data._align import ALIGNED_SIZE, align_face
from headreg.errors import DataFileError, DatasetNotFoundError

__all__ = ["IJB_KINDS", "IJBDataset", "IJBMeta", "read_ijb_meta"]

#: ``--dataset`` prefixes and the file prefix of their meta files.
IJB_KINDS = {"ijbb": "ijbb", "ijbc": "ijbc"}


@dataclass
class IJBMeta:
    """The meta files of one IJB benchmark, parsed and cross-checked.

    Attributes:
        images: ``N`` image names under ``loose_crop/``.
        landmarks: ``(N, 5, 2)`` float32 ``(x, y)`` of the eyes, nose tip and mouth corners.
        scores: ``(N,)`` float32 detector (faceness) scores.
        templates: ``(N,)`` int64 template of each face.
        medias: ``(N,)`` int64 media (photo or video) of each face.
        pair_templates: ``(P, 2)`` int64 the two templates of each pair.
        pair_labels: ``(P,)`` bool, whether the pair shows one subject.
    """

    images: list[str]
    landmarks: np.ndarray
    scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_templates: np.ndarray
    pair_labels: np.ndarray


def _lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFileError(f"{path}: empty")
    return lines


def _fields(path: Path, number: int, line: str, count: int, what: str) -> list[str]:
    fields = line.split()
    if len(fields) != count:
        raise DataFileError(f"{path}:{number}: expected {count} fields ({what}), got {len(fields)}: {line!r}")
    return fields


def _image_name(token: str, where: str) -> str:
    # A name is joined to loose_crop/: refuse anything that would leave that folder.
    if token.startswith(("/", "\\")) or ".." in Path(token).parts:
        raise DataFileError(f"{where}: {token!r} is not an image name under loose_crop/")
    return token


def _read_faces(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names: list[str] = []
    values: list[list[float]] = []
    for number, line in enumerate(_lines(path), start=1):
        fields = _fields(path, number, line, 12, "image, 5 landmarks x y, detector score")
        names.append(_image_name(fields[0], f"{path}:{number}"))
        try:
            values.append([float(v) for v in fields[1:]])
        except ValueError:
            raise DataFileError(f"{path}:{number}: landmarks and score must be numbers, got {line!r}") from None
    # float32, as insightface reads them (its landmarks and scores go through np.float32).
    table = np.asarray(values, dtype=np.float32)
    if not np.isfinite(table).all():
        bad = int(np.nonzero(~np.isfinite(table).all(axis=1))[0][0]) + 1
        raise DataFileError(f"{path}:{bad}: landmarks and score must be finite")
    return names, table[:, :10].reshape(-1, 5, 2), table[:, 10]


def _read_ints(path: Path, columns: int, what: str) -> np.ndarray:
    """A file of ``columns`` integers a line, parsed at numpy's speed (IJB-C's pair list has 15.7 M lines)."""
    text = path.read_text(encoding="ascii", errors="replace")
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    try:
        with warnings.catch_warnings():  # numpy warns, or raises, on a token it cannot read: the slow path names it
            warnings.simplefilter("ignore", DeprecationWarning)
            flat = np.fromstring(text, dtype=np.int64, sep=" ")  # text mode: any whitespace separates
    except ValueError:
        flat = None
    if flat is not None and flat.size == columns * lines and flat.size > 0:
        return flat.reshape(lines, columns)
    for number, line in enumerate(_lines(path), start=1):  # slow path only to name the bad line
        fields = _fields(path, number, line, columns, what)
        if not all(f.lstrip("-").isdigit() for f in fields):
            raise DataFileError(f"{path}:{number}: expected integers ({what}), got {line!r}")
    raise DataFileError(f"{path}: expected {columns} integers a line ({what}); blank lines are not allowed")


def _read_tid_mid(path: Path, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    lines = _lines(path)
    if len(lines) != len(images):
        raise DataFileError(
            f"{path}: {len(lines)} faces, but the 5-point file lists {len(images)}; both list each face"
        )
    ids = np.empty((len(lines), 2), dtype=np.int64)
    for i, line in enumerate(lines):
        fields = _fields(path, i + 1, line, 3, "image, template id, media id")
        if fields[0] != images[i]:
            raise DataFileError(
                f"{path}:{i + 1}: names {fields[0]!r}, but line {i + 1} of the 5-point file names {images[i]!r}; "
                "the two files must list the same faces in the same order"
            )
        if not (fields[1].isdigit() and fields[2].isdigit()):
            raise DataFileError(f"{path}:{i + 1}: template and media ids must be non-negative integers: {line!r}")
        ids[i] = int(fields[1]), int(fields[2])
    return ids[:, 0], ids[:, 1]


def read_ijb_meta(root: str | Path, kind: str) -> IJBMeta:
    """Parse and cross-check ``root/meta/<kind>_*.txt`` (``kind`` is ``ijbb`` or ``ijbc``).

    Raises:
        DatasetNotFoundError: a meta file or ``loose_crop/`` is missing (the expected layout named).
        DataFileError: a malformed line (``file:line``), face lists that disagree, a pair naming a template
            without faces, a label other than 0 / 1, or a pair list without both labels.
    """
    root = Path(root)
    prefix = IJB_KINDS[kind]
    meta = root / "meta"
    files = {k: meta / f"{prefix}_{k}.txt" for k in ("name_5pts_score", "face_tid_mid", "template_pair_label")}
    for path in (*files.values(), root / "loose_crop"):
        if not path.exists():
            raise DatasetNotFoundError(
                f"dataset '{kind}:{root}': {path} not found; expected insightface's IJB layout: "
                f"{root}/meta/{prefix}_name_5pts_score.txt, {prefix}_face_tid_mid.txt, "
                f"{prefix}_template_pair_label.txt and the images in {root}/loose_crop/"
            )
    images, landmarks, scores = _read_faces(files["name_5pts_score"])
    templates, medias = _read_tid_mid(files["face_tid_mid"], images)
    pairs = _read_ints(files["template_pair_label"], 3, "template id, template id, label")
    path = files["template_pair_label"]
    bad = np.nonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))[0]
    if bad.size:
        raise DataFileError(f"{path}:{bad[0] + 1}: the label must be 1 (same subject) or 0, got {pairs[bad[0], 2]}")
    known = np.unique(templates)
    orphan = np.nonzero(~np.isin(pairs[:, :2], known).all(axis=1))[0]
    if orphan.size:
        t = pairs[orphan[0], :2][~np.isin(pairs[orphan[0], :2], known)][0]
        raise DataFileError(f"{path}:{orphan[0] + 1}: template {t} has no face in {files['face_tid_mid']}")
    labels = pairs[:, 2].astype(bool)
    if labels.all() or not labels.any():
        raise DataFileError(f"{path}: every pair is labelled {int(labels[0])}; TAR@FAR needs both same and different")
    return IJBMeta(images, landmarks, scores, templates, medias, pairs[:, :2].copy(), labels)


class IJBDataset(Dataset):
    """The faces of an IJB benchmark, each decoded and aligned to 112x112 when it is read.

    ``dataset[i]`` is ``((3, 112, 112) uint8, i)``: the label is the face's row, which the protocol maps to its
    template through :attr:`meta`.

    Attributes:
        meta: The parsed :class:`IJBMeta`.
        protocol: ``"ijb"``, which routes :func:`headreg.engine.evaluate.evaluate_model` to the IJB protocol.
        aligned: True: samples are uint8 crops at their aligned size, which the batch transform normalises.
        faces: True: a face protocol (mean and std 0.5 where the backbone names none).
    """

    protocol = "ijb"
    aligned = True
    faces = True
    channels = 3
    image_size = (ALIGNED_SIZE, ALIGNED_SIZE)

    def __init__(self, root: str | Path, kind: str, *, name: str) -> None:
        self.root = Path(root)
        self.kind = kind
        self.name = name
        self.meta = read_ijb_meta(self.root, kind)
        self.targets = torch.arange(len(self.meta.images))

    @property
    def labels(self) -> torch.Tensor:
        return self.targets

    def __len__(self) -> int:
        return len(self.meta.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from headreg.data._pairs import _decode

        path = self.root / "loose_crop" / self.meta.images[index]
        if not path.is_file():  # a DataFileError: the loader strips a worker's traceback from its message
            raise DataFileError(
                f"dataset '{self.name}': image not found: {path} (line {index + 1} of the 5-point file)"
            )
        image = _decode(path, f"dataset '{self.name}': the image {path}").permute(2, 0, 1)
        return align_face(image, self.meta.landmarks[index]), index

    def __repr__(self) -> str:
        return f"IJBDataset(kind={self.kind!r}, root={str(self.root)!r}, faces={len(self)})"
