"""Shared by the CLI tests: run `headreg eval` in-process and insist on a clean exit or a clean error."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from headreg.cli import main


def invoke(*args: str | Path, ok: bool = True) -> Result:
    """`headreg eval ARGS`; ``ok=False`` expects a one-line error (SystemExit), never a traceback."""
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), f"traceback instead of a message: {result.exception!r}"
    return result
