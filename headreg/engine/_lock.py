"""One writer per output directory: an advisory ``flock`` on ``headreg.lock``, held for a run's whole life.

``headreg train`` (fresh or ``--resume``) and ``headreg compare`` take it before they touch their
directory, so a second writer fails at once with a message naming the holder, instead of both appending
to ``metrics.jsonl``. The kernel drops an ``flock`` when its process ends, however it ends (SIGKILL
included), so a lock left by a dead process is never in the way: the next writer simply takes it. The
pid and host written into the file are only for the message. The file itself stays (removing a lock
file while another process may be opening it would let two processes each lock a different file).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import RunLockedError

try:  # POSIX; elsewhere the lock is a no-op and one writer per directory is up to the user
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "DirLock"]

LOCK_NAME = "headreg.lock"


class DirLock:
    """The exclusive advisory lock of one directory; :meth:`acquire` is idempotent, :meth:`release` too.

    Args:
        directory: the directory to lock (must exist when :meth:`acquire` is called).
        what: what the holder is doing, for the message another process gets (``headreg train``).
    """

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`~headreg.errors.RunLockedError` naming the process that holds it."""
        if self._fd is not None or fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another headreg process ({holder}); one process writes a "
                "directory at a time: wait for that one to finish or stop it (Ctrl-C stops a run resumably)"
            ) from None
        except OSError:  # pragma: no cover - a file system without flock (some network mounts): go unlocked
            os.close(fd)
            return
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        """Let the lock go (the kernel would at exit anyway)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):  # written half-way by a holder that has just started: say what is known
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if "pid" not in info:
        return "pid unknown"
    since = info.get("since")
    when = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, float) else ""
    what = f"{info['what']}, " if isinstance(info.get("what"), str) else ""
    return f"{what}pid {info['pid']} on host {info.get('host', '?')}{when}"
