"""The run directory: every file a training run reads or writes, and the guard on ``--out``.

A run directory holds

- ``run.json``: the run record: config, status (``running``, ``stopped``, ``completed``), progress;
- ``model.safetensors`` + ``config.json``: the model, as :func:`headreg.save_model` writes it (a class-sharded
  head's: ``model.safetensors.index.json`` + ``model-<N>-<r>-of-<W>.safetensors``, one file per rank);
- ``metrics.jsonl``: one JSON line per finished epoch;
- ``eval.json``: the final evaluation;
- ``best/``: the model of the best validation (``--keep-best``), ``model.safetensors`` + ``config.json``;
- ``tensorboard/``: TensorBoard event files (``--tensorboard``);
- ``resume.json`` + ``resume-<generation>.safetensors``: everything needed to continue exactly (see
  :mod:`headreg.engine._checkpoint` for how nested state becomes tensors + JSON); a class-sharded head's run
  writes ``resume-<generation>-<r>-of-<W>.safetensors``, one per rank, which ``resume.json`` indexes
  (:mod:`headreg.models._shards`);
- ``headreg.lock``: the lock that keeps a second writer out (:mod:`headreg.engine._lock`).

:class:`RunDir` is the only code that touches these files; ``train``, ``resume`` and ``compare`` go
through it, and ``compare`` guards its own ``--out`` with the same :func:`claim_out_dir`. Writes are
atomic (:mod:`headreg._atomic`: temp file, fsync, rename), so a crash leaves the previous version, never
half a file. Reads of JSON go through :meth:`RunDir.read_json`, the one place where a schema check of
what was read belongs; claiming a directory takes the lock against a second writer.

The resumable state is two files that must agree, so it is committed by one rename: each save writes
its tensors under a new name, ``resume-<N>.safetensors`` (N one more than the generation in force), and
then atomically replaces ``resume.json``, which names generation N; only after that is generation N − 1
removed. A kill at any instant leaves a ``resume.json`` whose generation is complete on disk: the new one
if the rename happened, else the old one. Runs written before generations (``resume.json`` without one,
beside ``resume.safetensors``) still resume; their first save moves them to the new layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._atomic import atomic_output, atomic_write_text
from ..errors import CheckpointError
from ..models._shards import RowSplit, ShardSet, unshared, write_shards
from ..models._shards_read import read_shards
from ._lock import LOCK_NAME, DirLock
from ._outdir import (
    EVAL,
    METRICS,
    RESUME_GENERATION,
    RESUME_JSON,
    RESUME_TENSORS,
    RUN_CONFIG,
    RUN_FILES,
    RUN_LAYOUT,
    OutLayout,
    claim_out_dir,
)

__all__ = ["RUN_FILES", "RUN_LAYOUT", "OutLayout", "RunDir", "atomic_write_text", "claim_out_dir", "write_json"]

RUN_FORMAT = "headreg.run/1"
RESUME_FORMAT = "headreg.resume/2"
_RESUME_FORMATS = ("headreg.resume/1", RESUME_FORMAT)  # /1: one resume.safetensors, replaced in place


# ---------------------------------------------------------------------------------------------- atomic writes
def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically (:func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import torch

    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------------------------------------- the run directory
class RunDir:
    """One training run's directory; rank 0 of a run writes through it, every rank may read.

    Args:
        path: the directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = DirLock(self.path, "headreg train")

    # -------------------------------------------------------------------------------------- JSON files
    def read_json(self, name: str, *, missing: str) -> Any:
        """The parsed JSON file ``name``; CheckpointError with ``missing`` when absent, or when it is not JSON.

        Every JSON read of a run directory comes through here: where a schema check of the content goes.
        """
        from .._schema_backbone import check_run_file

        path = self.path / name
        if not path.is_file():
            raise CheckpointError(missing)
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
        return check_run_file(name, obj, str(path))  # its declared schema (headreg._schema)

    def read_record(self) -> dict[str, Any]:
        """``run.json``; CheckpointError when absent, unreadable, off its schema, or not the run of the weights."""
        from ..models.checkpoint import check_run_weights

        record = self.read_json(
            RUN_CONFIG, missing=f"run directory {self.path} holds no {RUN_CONFIG}; is it a `headreg train` run?"
        )
        check_run_weights(self.path, record["config"])
        return record

    def write_record(self, record: dict[str, Any]) -> None:
        """Write ``run.json``: ``record`` under the run format's name."""
        write_json(self.path / RUN_CONFIG, {"format": RUN_FORMAT, **record})

    def write_eval(self, result: dict[str, Any]) -> None:
        """Write ``eval.json``."""
        write_json(self.path / EVAL, result)

    # -------------------------------------------------------------------------------------- new runs
    def claim(self, config: dict[str, Any], *, overwrite: bool, lock: bool = False) -> None:
        """Create the directory for a new run with ``config`` (see :func:`claim_out_dir`), with :attr:`lock` held."""
        claim_out_dir(
            self.path, RUN_LAYOUT, overwrite=overwrite, occupied=lambda _: self._occupied(config),
            lock=self.lock if lock else None,
        )  # fmt: skip

    def clear_leftovers(self) -> None:
        """Remove the temporary files a killed write left behind (a resumed run's first step)."""
        best = self.path / "best"
        for entry in [*self.path.iterdir(), *(best.iterdir() if best.is_dir() else ())]:
            if entry.name != LOCK_NAME and RUN_LAYOUT.leftover(entry) and entry.is_file():
                entry.unlink(missing_ok=True)

    def _occupied(self, config: dict[str, Any]) -> str:
        path = self.path
        try:
            old = json.loads((path / RUN_CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is None:
            return f"--out {path} already holds a headreg run; pass --overwrite to replace it or choose a new directory"
        old_cfg = old.get("config", old)
        diff = [k for k in sorted(set(old_cfg) | set(config)) if k != "out" and old_cfg.get(k) != config.get(k)]
        status = old.get("status", "unknown")
        if diff:
            shown = "; ".join(f"{k}: {old_cfg.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
            return (
                f"--out {path} already holds a different run (status {status}; {shown}); "
                "pass --overwrite to replace it or choose a new directory"
            )
        hint = f"`headreg train --resume {path}` continues it, " if status != "completed" else ""
        return f"--out {path} already holds this run (status {status}); {hint}--overwrite trains it again"

    # -------------------------------------------------------------------------------------- metrics.jsonl
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's line to ``metrics.jsonl`` and flush it (a reader sees each epoch as it ends)."""
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epoch lines of ``metrics.jsonl`` (none when absent), up to a torn last line."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        from .._schema import METRICS_LINE, validate

        out = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line
            out.append(validate(record, METRICS_LINE, where=f"{path} line {i}"))
        return out

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` with ``records``, atomically."""
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    # -------------------------------------------------------------------------------------- model
    def save_model(self, model: Any, metadata: dict[str, Any]) -> None:
        """Write ``model.safetensors`` + ``config.json`` (:func:`headreg.save_model`).

        Rank 0 calls it; under a class-sharded head every rank does (each writes its own rows).
        """
        from ..models import save_model

        save_model(model, self.path, metadata=metadata)

    def save_best(self, model: Any, metadata: dict[str, Any]) -> None:
        """Write ``best/model.safetensors`` + ``config.json``, the best validation's model (``--keep-best``).

        The weights file carries its own config and is replaced atomically (a sharded head's index is), so
        ``best/`` always loads. Called as :meth:`save_model` is.
        """
        from ..models import save_model

        save_model(model, self.path / "best", metadata=metadata)

    # -------------------------------------------------------------------------------------- resumable state
    def save_state(self, state: dict[str, Any], split: RowSplit | None = None) -> None:
        """Commit the resumable ``state``: a new tensors generation, then ``resume.json`` naming it, atomically.

        See the module docstring for why no kill can leave a ``resume.json`` and tensors that disagree.

        Args:
            state: the state (rank 0's, whole), or on another rank of a class-sharded run its model and
                optimiser state, of which only the keys ``split`` names are written.
            split: a class-sharded run's per-row tensors (:func:`~headreg.engine._shard_head.train_state`):
                then every rank calls this (a collective) and writes its own file, and ``resume.json`` indexes
                them.
        """
        from safetensors.torch import save_file

        from ..models.checkpoint import tensors_sha256
        from ._checkpoint import STATE_PREFIX, split_state

        tensors: dict[str, Any] = {}
        tree = split_state(state, tensors, STATE_PREFIX)  # the live tensors (CPU), not copies
        step = str(state.get("progress", {}).get("global_step", -1))
        if split is not None:
            self._save_state_shards(tree, tensors, step, split)
            return
        tensors = unshared(tensors)  # safetensors refuses tensors that share storage
        generation = max([0, *self._generations()]) + 1
        with atomic_output(self.path / _generation_name(generation)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": RESUME_FORMAT, "global_step": step})
        meta = {"format": RESUME_FORMAT, "generation": generation, "global_step": step, "state": tree}
        meta["weights_sha256"] = tensors_sha256(tensors)  # safetensors has no checksum: a flipped byte shows
        write_json(self.path / RESUME_JSON, meta)  # the commit
        for old in [*self._generations(), 0]:  # the superseded tensors (0: the layout before generations)
            if old != generation:
                (self.path / _generation_name(old)).unlink(missing_ok=True)

    def _save_state_shards(self, tree: Any, tensors: dict[str, Any], step: str, split: RowSplit) -> None:
        def commit(shards: ShardSet) -> None:
            meta = {"format": RESUME_FORMAT, "global_step": step, "state": tree, "shards": shards.to_json()}
            write_json(self.path / RESUME_JSON, meta)  # the commit
            for old in [*self._generations(), 0]:  # a one-file state it replaces
                (self.path / _generation_name(old)).unlink(missing_ok=True)

        write_shards(self.path, "resume", tensors, split, commit)

    def _generations(self) -> list[int]:
        """The tensor generations on disk (complete files only: a killed write leaves a temporary name)."""
        found = (RESUME_GENERATION.match(p.name) for p in self.path.iterdir()) if self.path.is_dir() else ()
        return [int(m.group(1)) for m in found if m]

    def has_state(self) -> bool:
        """Whether a resumable state was ever committed here (else a resumed run starts from the beginning)."""
        return (self.path / RESUME_JSON).is_file()

    def load_state(self, verify: bool = True, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """Read the state :meth:`save_state` committed; CheckpointError when missing, torn or foreign.

        Args:
            verify: check the tensors against their recorded SHA-256 (``--no-verify`` skips it).
            rank: this process's rank, and
            world_size: the number of processes now: of a class-sharded run's per-row tensors only the rows
                of this rank's block of classes are read (:func:`~headreg.heads._sharded.shard_bounds`).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        from ..models.checkpoint import verify_tensors
        from ._checkpoint import join_state

        tj = self.path / RESUME_JSON
        where = f"--resume {self.path}"
        if not tj.is_file():
            raise CheckpointError(f"{where}: no resumable state ({RESUME_JSON} and its tensors) in that directory")
        try:
            meta = self.read_json(RESUME_JSON, missing="")
            if "shards" in meta:
                return self._load_state_shards(meta, verify, rank, world_size)
            ts = self.path / _generation_name(meta.get("generation", 0))
            if not ts.is_file():
                raise CheckpointError(f"{ts.name}, which {RESUME_JSON} names, is missing")
            with safe_open(str(ts), framework="pt") as f:
                tmeta = f.metadata() or {}
            tensors = load_file(str(ts), device="cpu")
        except CheckpointError as exc:  # already names the file and what is wrong with it
            raise CheckpointError(f"{where}: resumable state is unreadable: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - json / safetensors errors alike mean an unreadable file
            raise CheckpointError(f"{where}: resumable state is unreadable ({type(exc).__name__}: {exc})") from None
        if meta.get("format") not in _RESUME_FORMATS or tmeta.get("format") != meta.get("format"):
            raise CheckpointError(
                f"{where}: resume files have format {meta.get('format')!r} and {tmeta.get('format')!r}, "
                f"expected {RESUME_FORMAT!r}"
            )
        if meta.get("global_step") != tmeta.get("global_step"):
            raise CheckpointError(
                f"{where}: {RESUME_JSON} (step {meta.get('global_step')}) and {ts.name} "
                f"(step {tmeta.get('global_step')}) disagree; the run was stopped while saving"
            )
        if "weights_sha256" in meta:  # recorded since headreg.resume/2
            verify_tensors(tensors, meta["weights_sha256"], where=str(ts), verify=verify)
        return join_state(meta["state"], tensors)

    def _load_state_shards(self, meta: dict[str, Any], verify: bool, rank: int, world_size: int) -> dict[str, Any]:
        from ..heads._sharded import shard_bounds
        from ._checkpoint import join_state

        where = str(self.path / RESUME_JSON)
        if meta.get("format") != RESUME_FORMAT:
            raise CheckpointError(f"format {meta.get('format')!r}, expected {RESUME_FORMAT!r}")
        shards = ShardSet.from_json(meta["shards"], where)
        if shards.num_classes < world_size:
            raise CheckpointError(f"the run's {shards.num_classes} classes cannot be split over {world_size} processes")
        classes = shard_bounds(shards.num_classes, world_size, rank)
        return join_state(meta["state"], read_shards(self.path, shards, classes=classes, verify=verify, where=where))


def _generation_name(generation: Any) -> str:
    """The tensors file of ``generation``; 0 (or none recorded) is the layout before generations."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise CheckpointError(f"{RESUME_JSON}: generation must be an integer >= 0, got {generation!r}")
    return RESUME_TENSORS if generation == 0 else f"resume-{generation}.safetensors"
