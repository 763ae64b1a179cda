"""Atomic file writes: a temporary file in the same directory, flushed, fsynced, renamed over the target.

The lowest layer of headreg's file output (it imports nothing from headreg), so the run directory, the
CLI's result files and ``compare``'s tables share one writer. A crash or a kill at any instant leaves
either the old file or the new one under the real name, never half of one; what it can leave besides is
a temporary file, named by :func:`temp_name` (or safetensors' own ``.tmpXXXXXX``), which
:func:`temp_target` recognises so that a directory guard ignores or removes it instead of refusing.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "temp_name", "temp_target"]

#: safetensors (0.4+) writes through a ``tempfile``-crate file in the target's directory, then renames it.
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def temp_name(path: Path) -> Path:
    """The temporary sibling an atomic write of ``path`` goes through: ``x.json`` → ``x.json.tmp``.

    A writer that picks its format from the suffix (matplotlib, safetensors) gets the suffix kept:
    see :func:`atomic_output`.
    """
    return path.with_name(path.name + ".tmp")


def _suffixed_temp(path: Path) -> Path:
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def temp_target(name: str) -> str | None:
    """The file whose atomic write leaves a temporary file called ``name``, or None if ``name`` is no such file.

    ``x.json.tmp`` → ``x.json`` (:func:`temp_name`), ``fig.tmp.png`` → ``fig.png`` (:func:`atomic_output`);
    safetensors' own ``.tmpXXXXXX`` gives ``""`` (it does not say which file it was for).
    """
    if _SAFETENSORS_TEMP.match(name):
        return ""
    if name.endswith(".tmp") and len(name) > 4:
        return name[:-4]
    stem, dot, suffix = name.rpartition(".")
    if dot and stem.endswith(".tmp") and len(stem) > 4:
        return f"{stem[:-4]}.{suffix}"
    return None


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename in it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse to sync a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writing(path: Path, tmp: Path) -> Iterator[None]:
    """Remove ``tmp`` when the block fails; an OSError of ``tmp`` (or of no file) is reported as one of ``path``.

    ``path`` is the name the user gave; the temporary name would only puzzle them (a full disk fails in
    ``write``, which names no file at all).
    """
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):  # under a file, or read-only: there is no temporary file either
            tmp.unlink(missing_ok=True)
        named = getattr(exc, "filename", None)
        if isinstance(exc, OSError) and exc.errno is not None and named in (None, str(tmp), tmp):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def _commit(tmp: Path, path: Path) -> None:
    """fsync the written ``tmp``, rename it over ``path`` and sync the directory, so the rename survives a crash."""
    with _writing(path, tmp):
        with open(tmp, "rb+") as f:  # writers such as safetensors and matplotlib close without fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); a failure leaves the old file."""
    path = Path(path)
    tmp = temp_name(path)
    with _writing(path, tmp), open(tmp, "wb") as f:
        f.write(data)
    _commit(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: flushed, fsynced, then renamed over the old file."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; on a clean exit it is fsynced and renamed to ``path``.

    The temporary file keeps ``path``'s suffix (``plot.png`` → ``plot.tmp.png``), for writers that choose
    the format from it. On an error the temporary file is removed and the old ``path`` is left as it was.

    Example:
        >>> with atomic_output(Path("fig.png")) as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp)
    """
    path = Path(path)
    tmp = _suffixed_temp(path)
    with _writing(path, tmp):
        yield tmp
    _commit(tmp, path)
