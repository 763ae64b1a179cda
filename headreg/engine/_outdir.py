"""What a command's ``--out`` directory may hold, and the guard that claims it (:func:`claim_out_dir`).

The names of a training run's files (:data:`RUN_FILES`, :data:`RUN_LAYOUT`) live here, beside the guard
that knows which of them ``--overwrite`` may remove; :class:`~headreg.engine._rundir.RunDir` reads and
writes them. ``compare`` guards its own ``--out`` with the same :func:`claim_out_dir`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._atomic import temp_target
from ..errors import InvalidValueError
from ..models._shards import INDEX_NAME, SHARD_FILE
from ._lock import LOCK_NAME, DirLock

__all__ = ["RUN_FILES", "RUN_LAYOUT", "RUN_SUBDIRS", "OutLayout", "claim_out_dir"]

RUN_CONFIG = "run.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
RESUME_TENSORS = "resume.safetensors"  # the layout before generations (format headreg.resume/1)
RESUME_JSON = "resume.json"
#: One generation of the resumable state's tensors; ``resume.json`` names the one in force.
RESUME_GENERATION = re.compile(r"^resume-([1-9][0-9]*)\.safetensors$")
#: The generations, and a sharded run's per-rank files (``model-<N>-<r>-of-<W>``, ``resume-<N>-<r>-of-<W>``).
_GENERATED = re.compile(f"{RESUME_GENERATION.pattern}|{SHARD_FILE.pattern}")
#: Files a training run writes; ``--overwrite`` removes exactly these (and the generations), nothing else.
RUN_FILES = (RUN_CONFIG, "model.safetensors", INDEX_NAME, "config.json", METRICS, EVAL, RESUME_TENSORS, RESUME_JSON)
#: Sub-directories a training run writes whole; ``--overwrite`` removes them with the files.
RUN_SUBDIRS = ("best", "tensorboard")


# ---------------------------------------------------------------------------------------------- the --out guard
@dataclass(frozen=True)
class OutLayout:
    """What a command writes into its ``--out`` directory, so the guard knows what it may find and remove.

    Attributes:
        noun: what the directory holds (``run``, ``comparison``), for the refusal.
        files: names of the files the command writes; ``--overwrite`` removes these (and their ``.tmp``).
        run_subdirs: sub-directories holding a training run belong too (``compare``'s one per head; each is
            guarded by its own training run, so ``--overwrite`` leaves them); an empty one is ignored.
        pattern: further file names the command writes (the resume generations), removed as ``files`` are.
        subdirs: names of sub-directories the command writes whole (a run's ``best/``); removed as ``files`` are.
    """

    noun: str
    files: frozenset[str]
    run_subdirs: bool = False
    pattern: re.Pattern[str] | None = None
    subdirs: frozenset[str] = frozenset()

    def writes(self, name: str) -> bool:
        """Whether the command writes a file of this name: an output, or what a killed atomic write of one leaves."""
        target = temp_target(name)
        if target is not None:
            return target == "" or self._output(target)
        return self._output(name)

    def _output(self, name: str) -> bool:
        return name in self.files or (self.pattern is not None and self.pattern.match(name) is not None)

    def owns(self, entry: Path) -> bool:
        """Whether ``entry`` is something this command wrote (its lock file included)."""
        if entry.name == LOCK_NAME or self.writes(entry.name) or (entry.name in self.subdirs and entry.is_dir()):
            return True
        return self.run_subdirs and entry.is_dir() and (entry / RUN_CONFIG).exists()

    def leftover(self, entry: Path) -> bool:
        """Whether ``entry`` is no output at all: the lock file, or a temporary file a killed write left."""
        return entry.name == LOCK_NAME or (self.writes(entry.name) and not self._output(entry.name))


#: A training run's directory.
RUN_LAYOUT = OutLayout("run", frozenset(RUN_FILES), pattern=_GENERATED, subdirs=frozenset(RUN_SUBDIRS))


def claim_out_dir(
    path: Path,
    layout: OutLayout,
    *,
    overwrite: bool,
    occupied: Callable[[list[Path]], str],
    lock: DirLock | None = None,
) -> Path:
    """Create ``path`` for a new output, refusing a directory that already holds something unless ``overwrite``.

    With ``overwrite`` only the files ``layout`` owns are removed; a directory holding anything else is still
    refused, so a mistyped ``--out ~`` deletes nothing. Temporary files a killed write left (and the lock
    file) are no output: they are removed without ``overwrite``, never a reason to refuse.

    Args:
        path: the ``--out`` directory.
        layout: what the command writes there.
        overwrite: replace a previous output.
        occupied: the refusal's message, given what is there (the entries of a previous output).
        lock: taken once the directory is known to be ours (so a foreign one gets no lock file), before
            anything is checked for occupation or removed; the caller releases it.

    Returns:
        The directory, created.
    """
    _survey(path, layout)  # a foreign directory is refused before anything is created in it
    if lock is not None:
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        present = _survey(path, layout)
        output = [p for p in present if not layout.leftover(p)]
        if output and not overwrite:
            raise InvalidValueError(occupied(output))
        for entry in present:
            if entry.name != LOCK_NAME and layout.writes(entry.name) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
            elif entry.name in layout.subdirs and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
        path.mkdir(parents=True, exist_ok=True)
    except BaseException:
        if lock is not None:  # a refused claim holds nothing
            lock.release()
        raise
    return path


def _survey(path: Path, layout: OutLayout) -> list[Path]:
    """What ``path`` holds (nothing when absent); InvalidValueError for a file or anything not ours."""
    if path.exists() and not path.is_dir():
        raise InvalidValueError(f"--out must be a directory, got the file {path}")
    present = sorted(path.iterdir()) if path.is_dir() else []
    if layout.run_subdirs:  # a head whose run failed before writing anything leaves none, or only its lock
        present = [p for p in present if not (p.is_dir() and all(RUN_LAYOUT.leftover(q) for q in p.iterdir()))]
    foreign = [p.name for p in present if not layout.owns(p)]
    if foreign:
        raise InvalidValueError(
            f"--out {path} is not empty and holds files that are not a headreg {layout.noun} "
            f"({', '.join(foreign[:5])}); choose a new directory"
        )
    return present
