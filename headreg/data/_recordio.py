"""insightface's MXNet RecordIO training sets, without mxnet: ``--dataset rec:DIR`` (``DIR/train.rec`` + ``.idx``).

The format, as dmlc-core's ``RecordIOWriter`` writes it and ``mx.recordio.MXIndexedRecordIO`` reads it:

* ``train.idx`` is text, one ``key<TAB>byte offset`` line per record.
* At each offset: ``uint32`` magic ``0xced7230a``, ``uint32`` ``lrecord`` (length in the low 29 bits, a
  continuation flag ``cflag`` in the top 3), the data, then zero padding to a multiple of 4 bytes. A record
  whose data holds the magic at a 4-byte-aligned position is written in parts (``cflag`` 1 = first,
  2 = middle, 3 = last; 0 = whole), each part ending where a magic was; the reader joins the parts
  putting the magic back between them.
* The data is ``IRHeader`` = ``struct 'IfQQ'`` (``flag``, ``label``, ``id``, ``id2``, 24 bytes); when
  ``flag > 0`` the label is the ``flag`` float32 values that follow (the scalar is unused), then the image
  bytes (JPEG or PNG).
* Record 0 of insightface's sets is a header with ``flag > 0`` whose ``label[0]`` is one past the last image
  key (images are keys ``1 .. label[0] - 1``) and ``label[1]`` one past the last identity record (keys
  ``label[0] .. label[1] - 1``, each an ``IRHeader`` whose label is its images' key range). Without that header
  record every key is an image. An image's class is its label, or ``label[0]`` for a multi-float label, as
  insightface's ``MXFaceDataset`` reads it.

Records are read by offset (``os.pread``: no shared file position, so DataLoader workers and threads need no
lock; each process opens the file on first use) and decoded with PIL per sample in the DataLoader workers;
the loader's :class:`~headreg.data.ShardSampler` shards them over the ranks as it does image folders.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from headreg.errors import DataFileError, DatasetNotFoundError

__all__ = ["RecordDataset", "create_record_dataset", "read_index"]

MAGIC = 0xCED7230A
_FRAME = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# Bytes read per record when only the labels are wanted: the frame, the header and up to 6 label floats.
_PEEK = _FRAME.size + _HEADER.size + 24


def read_index(path: Path) -> dict[int, int]:
    """``key -> byte offset`` from an ``.idx`` file (``key<TAB>offset`` lines), checked line by line."""
    index: dict[int, int] = {}
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"cannot read the record index {path}: {err}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            key, offset = int(parts[0]), int(parts[1])
            if len(parts) != 2 or offset < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise DataFileError(
                f"{path}, line {number}: expected 'key<TAB>offset' with integers, got {line[:60]!r}"
            ) from None
        index[key] = offset
    return index


class RecordDataset(Dataset):
    """Images and labels of one ``.rec`` file, by random access through its ``.idx`` offsets.

    Attributes:
        path: the ``.rec`` file.
        targets: ``(N,)`` int64 labels (``labels`` is an alias), read once from every record's header.
        num_classes: ``label[1] - label[0]`` of the header record when there is one, at least ``max(label) + 1``.
        identity_range: ``(first, end)`` identity-record keys from the header record, or None.
        transform: per-sample callable (PIL image -> tensor), set by :func:`headreg.data.resolve_transform`.
    """

    channels = 3
    image_size = None

    def __init__(self, rec: Path, idx: Path, *, name: str, transform: Callable[[Any], Any] | None = None) -> None:
        self.path, self.name, self.transform = rec, name, transform
        self._fd: int | None = None
        self._pid = -1
        offsets = read_index(idx)
        if not offsets:
            raise DatasetNotFoundError(f"dataset '{name}': the record index {idx} lists no record")
        self.identity_range: tuple[int, int] | None = None
        keys = sorted(offsets)
        head = self._header(offsets[keys[0]], keys[0]) if keys[0] == 0 else None
        if head is not None and head[0] > 0 and len(head[1]) >= 2:
            end_images, end_ids = int(head[1][0]), int(head[1][1])
            self.identity_range = (end_images, end_ids)
            keys = list(range(1, end_images))
            missing = [k for k in keys[:1] + keys[-1:] if k not in offsets]
            if missing:
                raise DataFileError(f"{rec}: the header record says images are keys 1..{end_images - 1}, "
                                    f"but {idx} lacks key {missing[0]}")  # fmt: skip
        self._offsets = [offsets[k] for k in keys]
        self._keys = keys
        labels = [self._header(off, key)[1] for off, key in zip(self._offsets, keys, strict=True)]
        self.targets = torch.tensor([int(lab[0]) for lab in labels], dtype=torch.long)
        declared = 0 if self.identity_range is None else self.identity_range[1] - self.identity_range[0]
        self.num_classes = max(declared, int(self.targets.max()) + 1 if len(keys) else 0)
        self.classes = [str(c) for c in range(self.num_classes)]
        self._close()  # DataLoader workers open their own

    @property
    def labels(self) -> torch.Tensor:
        return self.targets

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        data = self._record(self._offsets[index], self._keys[index])
        flag = _HEADER.unpack_from(data)[0]
        start = _HEADER.size + 4 * flag
        try:
            from PIL import Image

            image = Image.open(io.BytesIO(data[start:]))
            image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DataFileError(
                f"dataset '{self.name}': cannot decode the image of record {self._keys[index]} in {self.path} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        target = int(self.targets[index])
        if self.transform is not None:
            return self.transform(image), target
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image), target

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}  # a worker opens the file itself

    def __del__(self) -> None:
        self._close()

    def __repr__(self) -> str:
        return f"RecordDataset(path={str(self.path)!r}, samples={len(self)}, classes={self.num_classes})"

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as err:
                raise DataFileError(f"dataset '{self.name}': cannot open {self.path}: {err}") from None
            self._pid = os.getpid()
        return self._fd

    def _close(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)  # type: ignore[arg-type]
        self._fd = None

    def _header(self, offset: int, key: int) -> tuple[int, list[float]]:
        """``(flag, label values)`` of the record at ``offset``: a short read, the whole record if need be."""
        head = os.pread(self._file(), _PEEK, offset)
        magic, lrec = _FRAME.unpack_from(head) if len(head) >= _FRAME.size else (0, 0)
        flag = _HEADER.unpack_from(head, _FRAME.size)[0] if len(head) >= _FRAME.size + _HEADER.size else -1
        length = min(lrec & _LENGTH_MASK, len(head) - _FRAME.size)
        if magic == MAGIC and lrec >> 29 == 0 and 0 <= flag <= 6 and length >= _HEADER.size + 4 * flag:
            data = head[_FRAME.size : _FRAME.size + length]
        else:  # a multi-part record, a long label, or a fault: read it properly (which names the fault)
            data = self._record(offset, key)
        return _parse_header(data, key, self.path)

    def _record(self, offset: int, key: int) -> bytes:
        """The data of the record at ``offset``, its parts joined (module docstring)."""
        fd, parts, pos = self._file(), [], offset
        while True:
            frame = os.pread(fd, _FRAME.size, pos)
            if len(frame) < _FRAME.size or _FRAME.unpack(frame)[0] != MAGIC:
                raise DataFileError(
                    f"{self.path}: no record at byte {pos} (record {key}); the .idx does not match the .rec, "
                    "or the file is truncated"
                )
            lrec = _FRAME.unpack(frame)[1]
            length, cflag = lrec & _LENGTH_MASK, lrec >> 29
            body = os.pread(fd, length, pos + _FRAME.size)
            if len(body) < length:
                raise DataFileError(f"{self.path}: record {key} is truncated at byte {pos + _FRAME.size + len(body)}")
            parts.append(body)
            if cflag in (0, 3):
                return struct.pack("<I", MAGIC).join(parts)
            if cflag not in (1, 2) or (cflag == 1) != (len(parts) == 1):
                raise DataFileError(f"{self.path}: record {key} has a bad continuation flag {cflag} at byte {pos}")
            pos += _FRAME.size + ((length + 3) & ~3)


def _parse_header(data: bytes, key: int, path: Path) -> tuple[int, list[float]]:
    if len(data) < _HEADER.size:
        raise DataFileError(f"{path}: record {key} holds {len(data)} bytes, less than its 24-byte header")
    flag, label = _HEADER.unpack_from(data)[:2]
    if flag == 0:
        return 0, [label]
    if len(data) < _HEADER.size + 4 * flag:
        raise DataFileError(f"{path}: record {key} declares {flag} label values but is {len(data)} bytes long")
    return flag, list(struct.unpack_from(f"<{flag}f", data, _HEADER.size))


def create_record_dataset(name: str, folder: Path, split: str) -> RecordDataset:
    """``rec:DIR``: ``DIR/<split>.rec`` with its ``.idx``; the ``test`` split falls back to ``train`` (one warning)."""
    folder = folder.resolve()
    rec, idx = folder / f"{split}.rec", folder / f"{split}.idx"
    if split == "test" and not rec.is_file():
        import warnings

        warnings.warn(
            f"dataset '{name}' has no test.rec; the test pass reads train.rec (the training images: not a held-out "
            "score; bound it with --test-limit, and evaluate on face pairs with `headreg eval --dataset bin:...`)",
            stacklevel=3,
        )
        rec, idx = folder / "train.rec", folder / "train.idx"
    if not rec.is_file() or not idx.is_file():
        missing = rec if not rec.is_file() else idx
        raise DatasetNotFoundError(
            f"dataset '{name}' not found: {missing} does not exist; expected insightface's RecordIO layout "
            f"{folder}/train.rec with {folder}/train.idx (and optionally test.rec + test.idx)"
        )
    return RecordDataset(rec, idx, name=name)
