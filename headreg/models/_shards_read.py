"""Reading a shard set (:mod:`headreg.models._shards`): a rank's block of rows, or a whole model file by file.

Each file is opened once, checked against the digest its index records (its bytes streamed from disk, a chunk
in memory at a time) and read by slices: rank ``r`` of any world size reads only the rows of its block of classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ._digest import check_digest, file_sha256
from ._shards import ShardSet

__all__ = ["read_shards", "fill_model"]


class _Files:
    """The open shard files of a set, each checked against its digest the first time it is opened."""

    def __init__(self, directory: Path, shards: ShardSet, verify: bool, where: str) -> None:
        self.directory, self.shards, self.verify, self.where = directory, shards, verify, where
        self._open: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._open:
            from safetensors import safe_open

            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{self.where}: {name}, which the index names, is missing")
            if self.verify:  # the whole file, streamed from disk: a chunk in memory, nothing mapped
                check_digest(file_sha256(path), self.shards.files[name], where=str(path))
            try:
                handle = safe_open(str(path), framework="pt")
                handle.__enter__()
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(
                    f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
                ) from None
            self._open[name] = handle
        return self._open[name]

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def read_shards(
    directory: Path,
    shards: ShardSet,
    *,
    classes: tuple[int, int] | None,
    keys: set[str] | None = None,
    verify: bool = True,
    where: str,
) -> dict[str, Tensor]:
    """Read a shard set: whole tensors, and of each split tensor the rows of ``classes``.

    Args:
        directory: where the files are.
        shards: the committed set.
        classes: ``(lo, hi)``: the classes whose rows to read (a rank's block); None: all of them.
        keys: read only these (None: all).
        verify: check each file opened against its digest, streaming (``--no-verify`` skips it).
        where: the state being read, for messages.

    Returns:
        ``{key: tensor}`` on the CPU; a split tensor holds only the requested rows.
    """
    files = _Files(directory, shards, verify, where)
    out: dict[str, Tensor] = {}
    try:
        for key, name in shards.weight_map.items():
            if keys is None or key in keys:
                out[key] = _get(files(name), key, files.directory / name)
        for key, parts in shards.row_shards.items():
            if keys is not None and key not in keys:
                continue
            total = parts[-1][2]
            per = total // shards.num_classes
            lo, hi = (0, total) if classes is None else (classes[0] * per, classes[1] * per)
            out[key] = _read_rows(files, key, parts, lo, hi)
    finally:
        files.close()
    return out


def _get(handle: Any, key: str, path: Path) -> Tensor:
    try:
        return handle.get_tensor(key)
    except Exception:  # noqa: BLE001 - safetensors' own error types
        raise CheckpointError(f"{path} holds no tensor {key!r}, which its index names") from None


def _read_rows(files: _Files, key: str, parts: list[tuple[str, int, int]], lo: int, hi: int) -> Tensor:
    """Rows ``[lo, hi)`` of a split tensor, sliced from the files that hold them (one part in memory at a time)."""
    out: Tensor | None = None
    for name, a, b in parts:
        s, e = max(a, lo), min(b, hi)
        if s >= e:
            continue
        handle = files(name)
        try:
            piece = handle.get_slice(key)
            if piece.get_shape()[0] != b - a:
                raise CheckpointError(
                    f"{files.directory / name}: {key} has {piece.get_shape()[0]} rows, the index says {b - a}"
                )
            block = piece[s - a : e - a]
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{files.directory / name} holds no tensor {key!r}, which its index names") from None
        if out is None:
            if s == lo and e == hi:
                return block
            out = torch.empty((hi - lo, *block.shape[1:]), dtype=block.dtype)
        if block.shape[1:] != out.shape[1:] or block.dtype != out.dtype:
            raise CheckpointError(f"{files.where}: the parts of {key} disagree in shape or dtype")
        out[s - lo : e - lo] = block
    if out is None:
        raise CheckpointError(f"{files.where}: no file holds rows {lo}..{hi} of {key}")
    return out


def fill_model(model: nn.Module, directory: Path, shards: ShardSet, *, verify: bool, where: str) -> None:
    """Copy a whole (unsharded) model's weights from a shard set, one file's tensor at a time.

    CheckpointError when the set's tensors and the model's do not match one for one, in names and shapes.
    """
    own = model.state_dict()
    listed = set(shards.weight_map) | set(shards.row_shards)
    missing, unexpected = sorted(set(own) - listed), sorted(listed - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    files = _Files(directory, shards, verify, where)
    try:
        with torch.no_grad():
            for key, target in own.items():
                if key in shards.weight_map:
                    name = shards.weight_map[key]
                    _put(target, _get(files(name), key, directory / name), key, where)
                    continue
                parts = shards.row_shards[key]
                if target.ndim == 0 or parts[-1][2] != target.shape[0]:
                    raise CheckpointError(
                        f"checkpoint {where} does not fit this model: {key} has {parts[-1][2]} rows, "
                        f"the model {tuple(target.shape)}"
                    )
                for name, a, b in parts:
                    _put(target[a:b], _read_rows(files, key, [(name, a, b)], a, b), key, where)
    finally:
        files.close()


def _put(target: Tensor, value: Tensor, key: str, where: str) -> None:
    if target.shape != value.shape:
        raise CheckpointError(
            f"checkpoint {where} does not fit this model: {key}: checkpoint {tuple(value.shape)} "
            f"vs model {tuple(target.shape)}"
        )
    target.copy_(value)
