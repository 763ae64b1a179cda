"""Shared by the CLI tests: run a `headreg` command in-process and insist on a clean exit or a clean error."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from headreg.cli import main


def invoke(*args: str | Path, ok: bool = True, command: str = "eval") -> Result:
    """`headreg COMMAND ARGS` (``eval`` by default); ``ok=False`` expects a one-line error (SystemExit), never a
    traceback."""
    result = CliRunner().invoke(main, [command, *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), f"traceback instead of a message: {result.exception!r}"
    return result
