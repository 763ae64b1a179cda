"""Checkpoints of a class-sharded head written as one file per rank, and read back on any number of processes.

A sharded run never gathers its head: each rank writes its own safetensors file and rank 0 commits a small
JSON index naming the files, in Hugging Face's sharded-checkpoint convention (``model.safetensors.index.json``
with ``metadata`` and ``weight_map``; the shard files are listed there by name). The convention maps a whole
tensor to one file; a tensor split by class rows (the head's weight, its optimiser moments) is listed instead
under ``row_shards``: ``{name: [[file, first row, end row], ...]}``, the files' blocks in row order, each stored
under the logical name. Replicated tensors (backbone, neck, a learned scale) are in rank 0's file only.

The same layout holds the resumable state (``resume.json`` carries the index as its ``shards``), so saving
needs one shard per rank, and loading reads only the rows a rank needs: rank ``r`` of a new world size takes
the rows :func:`~headreg.heads._sharded.shard_bounds` gives it, sliced from whichever files hold them
(``safe_open(...).get_slice``; :mod:`headreg.models._shards_read`). :func:`headreg.load_model` on one process
fills the full model file by file.

Integrity: each file's :func:`~headreg.models._digest.tensors_sha256` is recorded in the index and checked
tensor by tensor as it is streamed (one tensor in memory at a time). The file names are checked against
:data:`SHARD_FILE` before anything is opened, so a crafted index cannot make headreg read another file.

Commit: files are written under a new generation's names, then the index naming that generation replaces the
old one atomically, then the previous generation's files are removed. A kill at any instant leaves an index
whose files are complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from .._atomic import atomic_output
from ..errors import CheckpointError
from ._digest import tensors_sha256

__all__ = [
    "INDEX_NAME",
    "SHARD_FILE",
    "SHARDS_FORMAT",
    "RowSplit",
    "ShardSet",
    "logical_state",
    "write_shards",
    "generations",
    "unshared",
]

INDEX_NAME = "model.safetensors.index.json"
SHARDS_FORMAT = "headreg.shards/1"
#: ``<stem>-<generation>-<rank + 1>-of-<world size>.safetensors``: the only names an index may list.
SHARD_FILE = re.compile(r"^(model|resume)-([1-9][0-9]{0,8})-([0-9]{5})-of-([0-9]{5})\.safetensors$")
_HEAD, _INNER = "head.", "head.inner."


def shard_name(stem: str, generation: int, rank: int, world: int) -> str:
    """The file of ``rank`` in generation ``generation`` of ``stem`` (``model`` or ``resume``)."""
    return f"{stem}-{generation}-{rank + 1:05d}-of-{world:05d}.safetensors"


def generations(directory: Path, stem: str) -> set[int]:
    """The generations of ``stem``'s shard files in ``directory`` (complete files only)."""
    found = (SHARD_FILE.match(p.name) for p in directory.iterdir()) if directory.is_dir() else ()
    return {int(m.group(2)) for m in found if m and m.group(1) == stem}


# ---------------------------------------------------------------------------------------------- a rank's part
@dataclass(frozen=True)
class RowSplit:
    """This rank's part of the tensors split by class rows.

    Attributes:
        rows: ``{key: (first row, end row)}`` of the logical tensor that this rank holds, for every split key.
        num_classes: ``C``; a tensor of ``C · k`` rows has ``k`` rows per class (sub-centres).
    """

    rows: dict[str, tuple[int, int]]
    num_classes: int


def logical_state(model: nn.Module) -> tuple[dict[str, Tensor], RowSplit | None]:
    """``model``'s state under the unsharded names, this rank's head rows in place of the whole head.

    Returns:
        The state dict (``head.inner.x`` named ``head.x``; no copies) and, for a class-sharded head, which
        keys hold only this rank's rows (None for an unsharded model).
    """
    from ..heads._sharded import ShardedHead

    head = getattr(model, "head", None)
    state = model.state_dict()
    if not isinstance(head, ShardedHead):
        return state, None
    out: dict[str, Tensor] = {}
    rows: dict[str, tuple[int, int]] = {}
    for key, t in state.items():
        if not key.startswith(_INNER):
            out[key] = t
            continue
        name = _HEAD + key[len(_INNER) :]
        out[name] = t
        if t.ndim:  # per class (ShardedHead refuses any other); 0-d tensors are replicated
            rows[name] = row_range(t.shape[0], head)
    return out, RowSplit(rows, head.num_classes)


def row_range(local_rows: int, head: Any) -> tuple[int, int]:
    """The logical rows of a per-class tensor of ``local_rows`` rows on ``head``'s rank."""
    per = local_rows // (head.hi - head.lo)
    return head.lo * per, head.hi * per


# ---------------------------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class ShardSet:
    """A committed set of shard files: what the index (or ``resume.json``'s ``shards``) records.

    Attributes:
        generation: the files' generation.
        num_classes: ``C`` of the split tensors.
        files: ``{file: tensors_sha256}``.
        weight_map: ``{key: file}`` for whole tensors.
        row_shards: ``{key: [(file, first row, end row), ...]}`` in row order, covering ``[0, rows)``.
    """

    generation: int
    num_classes: int
    files: dict[str, str]
    weight_map: dict[str, str]
    row_shards: dict[str, list[tuple[str, int, int]]]

    def to_json(self) -> dict[str, Any]:
        """The JSON the index holds (Hugging Face's ``metadata`` + ``weight_map``, and ``row_shards``)."""
        return {
            "metadata": {
                "format": SHARDS_FORMAT,
                "generation": self.generation,
                "num_classes": self.num_classes,
                "sha256": dict(sorted(self.files.items())),
            },  # fmt: skip
            "weight_map": dict(sorted(self.weight_map.items())),
            "row_shards": {k: [list(p) for p in v] for k, v in sorted(self.row_shards.items())},
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ShardSet:
        """Parse and check an index; CheckpointError naming ``where`` for anything off."""
        from .._schema import SHARD_INDEX, validate

        obj = validate(obj, SHARD_INDEX, where=where)
        meta = obj["metadata"]
        if meta["format"] != SHARDS_FORMAT:
            raise CheckpointError(f"{where}: format {meta['format']!r}, expected {SHARDS_FORMAT!r}")
        files = dict(meta["sha256"])
        for name in files:
            m = SHARD_FILE.match(name)
            if not m:
                raise CheckpointError(
                    f"{where}: {name!r} is not a shard file name (e.g. 'model-1-00001-of-00002.safetensors')"
                )
            if int(m.group(2)) != meta["generation"]:
                raise CheckpointError(
                    f"{where}: {name} is not of generation {meta['generation']}, which the index names"
                )
        row_shards: dict[str, list[tuple[str, int, int]]] = {}
        for key, parts in obj["row_shards"].items():
            end = 0
            for part in parts:
                if not (len(part) == 3 and isinstance(part[0], str) and all(_is_int(x) for x in part[1:])):
                    raise CheckpointError(
                        f"{where}: row_shards.{key} parts must be [file, first row, end row], got {part!r}"
                    )
                if part[1] != end or part[2] <= part[1]:
                    raise CheckpointError(f"{where}: row_shards.{key} does not cover its rows in order ({parts!r})")
                end = part[2]
            row_shards[key] = [tuple(p) for p in parts]  # type: ignore[misc]
        for key, name in [*obj["weight_map"].items(), *((k, p[0]) for k, v in row_shards.items() for p in v)]:
            if name not in files:
                raise CheckpointError(f"{where}: {key} is in {name!r}, which the index does not list with a digest")
        if set(obj["weight_map"]) & set(row_shards):
            raise CheckpointError(f"{where}: a tensor is both whole and split by rows")
        return cls(meta["generation"], meta["num_classes"], files, dict(obj["weight_map"]), row_shards)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# ---------------------------------------------------------------------------------------------- writing
def _exchange(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (one process: ``[obj]``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_shards(
    directory: Path,
    stem: str,
    tensors: Mapping[str, Tensor],
    split: RowSplit,
    commit: Callable[[ShardSet], None],
) -> None:
    """Write this rank's file of a new generation; rank 0 then commits the set. Collective: every rank calls it.

    Args:
        directory: where the files go (every rank must see the same directory).
        stem: ``model`` or ``resume``.
        tensors: on rank 0 every tensor (whole ones and its rows of the split ones); on the others their rows
            of the split ones (other keys are left out).
        split: which keys are split, and this rank's rows of each.
        commit: called on rank 0 with the set once every file is written: writes the JSON that names it,
            atomically. Then the previous generations' files are removed.

    When it returns (on any rank), the new set is committed.

    Raises:
        CheckpointError: on every rank when any rank failed to write its file or rank 0 failed to commit.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = len(_exchange(None))
    generation = _exchange(max(generations(directory, stem), default=0) + 1 if rank == 0 else None)[0]
    name = shard_name(stem, generation, rank, world)
    mine = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if rank == 0 or k in split.rows}
    mine = unshared(mine)
    report: tuple[str, str, dict[str, tuple[int, int]], str | None]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        with atomic_output(directory / name) as tmp:
            save_file(mine, str(tmp), metadata={"format": SHARDS_FORMAT, "generation": str(generation)})
        report = (name, tensors_sha256(mine), split.rows, None)
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
        report = (name, "", split.rows, f"rank {rank}: {type(exc).__name__}: {exc}")
    reports = _exchange(report)
    failed = [r[3] for r in reports if r[3]]
    if failed:
        raise CheckpointError(f"could not write the {stem} shards in {directory}: {'; '.join(failed)}")
    first = reports[0][0]
    shards = ShardSet(
        generation=generation,
        num_classes=split.num_classes,
        files={r[0]: r[1] for r in reports},
        weight_map={k: first for k in mine if k not in split.rows} if rank == 0 else {},
        row_shards={k: [(r[0], *r[2][k]) for r in reports] for k in split.rows},
    )
    error = None
    if rank == 0:
        try:
            commit(shards)
            for old in generations(directory, stem) - {generation}:
                for path in directory.glob(f"{stem}-{old}-*-of-*.safetensors"):
                    path.unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - as above
            error = f"{type(exc).__name__}: {exc}"
    errors = [e for e in _exchange(error) if e]
    if errors:
        raise CheckpointError(f"could not commit the {stem} shards in {directory}: {errors[0]}")


def unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing storage: copy those that do (a view of another, a CPU alias)."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen or t.numel() != t.untyped_storage().nbytes() // t.element_size() else t
        seen.add(ptr)
    return out
