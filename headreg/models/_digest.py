"""Digests of tensors, recorded when a checkpoint or a resumable state is written and checked when it is read.

safetensors has no checksum of its own: :func:`tensors_sha256` is headreg's, over names, dtypes, shapes and
bytes, so it does not depend on how the file lays the tensors out and can live in the file's own header.
:func:`file_sha256` computes the same digest from a file's bytes, a chunk at a time, so checking a file
of any size holds no tensor in memory.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["UnverifiedCheckpointWarning", "tensors_sha256", "file_sha256", "verify_tensors", "check_digest"]


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint (or resumable state) written before headreg recorded digests: loaded without a check."""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors: each name, dtype and shape, then its bytes, in name order.

    It depends on the tensors only, not on how safetensors lays out the file, so it can be stored in the
    file's own header (``weights_sha256``) and is the same for the state dict saved and the one loaded.

    Args:
        tensors: ``{name: tensor}``, any devices and dtypes.

    Returns:
        64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


def verify_tensors(
    tensors: Mapping[str, torch.Tensor], expected: str | None, *, where: str, verify: bool = True
) -> None:
    """Check ``tensors`` against the digest recorded when they were written.

    For :func:`load_model` and for the resumable state (``RunDir`` records ``tensors_sha256`` of what it
    writes as ``weights_sha256`` and checks it here on reading).

    Args:
        tensors: what was read.
        expected: the recorded ``tensors_sha256``; None for files written before digests were recorded,
            which load with an :class:`UnverifiedCheckpointWarning`.
        where: the file, for the messages.
        verify: False skips the check (``--no-verify``).
    """
    if not verify:
        return
    if expected is None:
        warnings.warn(
            f"{where} records no weights_sha256 (written by an older headreg); loaded without an integrity check",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
        return
    check_digest(tensors_sha256(tensors), expected, where=where)


def check_digest(actual: str, expected: str, *, where: str) -> None:
    """CheckpointError ("checksum mismatch") naming ``where`` unless the two digests agree."""
    if actual != expected:
        raise CheckpointError(
            f"{where}: checksum mismatch: the tensors have SHA-256 {actual[:16]}..., the file recorded "
            f"{expected[:16]}... when it was written; the file is corrupt or was modified "
            "(--no-verify / verify=False loads it anyway)"
        )


#: safetensors' dtype codes, as the torch dtypes :func:`tensors_sha256` names.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """:func:`tensors_sha256` of a safetensors file's tensors, read from the file a chunk at a time.

    Nothing is mapped or loaded: memory stays at one chunk whatever the file's size (a shard of a million
    classes' head), and only the file's bytes are read, in the layout the safetensors format documents
    (8 bytes of header length, the JSON header, the data).

    Raises:
        CheckpointError: not a safetensors file, truncated, or a dtype headreg does not write.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
            digest = hashlib.sha256()
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                dtype = _DTYPES[info["dtype"]]
                digest.update(json.dumps([name, str(dtype), list(info["shape"])]).encode() + b"\0")
                start, end = info["data_offsets"]
                f.seek(8 + size + start)
                left = end - start
                while left:
                    buf = f.read(min(chunk, left))
                    if not buf:
                        raise ValueError(f"{name} is cut short")
                    digest.update(buf)
                    left -= len(buf)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return digest.hexdigest()
