"""The ``headreg`` command line.

Each command lives in its own module, imported only when listed or run; nothing here
imports torch at module level, so ``headreg --help`` and ``headreg --version`` are fast.
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any

import click

from .._version import __version__

# command name -> "module:attribute", imported on demand
COMMANDS = {
    "list": "headreg.cli.heads:list_cmd",
    "plugins": "headreg.cli.heads:plugins_cmd",
    "train": "headreg.cli.train:train_cmd",
    "eval": "headreg.cli.eval:eval_cmd",
    "compare": "headreg.cli.compare:compare_cmd",
    "export": "headreg.cli.export:export_cmd",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # a command not written yet: leave it out
                return None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="headreg")
def main() -> None:
    """headreg: metric-learning loss heads for timm and torchvision backbones.

    List the heads, train a backbone with one, evaluate the embeddings, and compare
    heads side by side. `headreg COMMAND --help` for each command.
    """


#: Printed (on stderr, before the traceback) when a command fails in a way no user mistake explains.
REPORT_BUG = (
    "headreg: internal error: this is a bug in headreg (or a plugin), not a mistake in your command; please "
    "report it on the headreg issue tracker with the command you ran and the traceback below"
)

# What an OSError's errno means for a path the user gave, said plainly (by name: not every platform has all).
_OS_HINTS = {
    getattr(errno, name): hint
    for name, hint in (
        ("ENOTDIR", "a part of the path is a file, not a folder"),
        ("EISDIR", "it is a folder; give a file name"),
        ("EACCES", "no permission"),
        ("EPERM", "not permitted"),
        ("EROFS", "the file system is read-only"),
        ("ENOSPC", "the disk is full"),
        ("EDQUOT", "the disk quota is used up"),
        ("ENOENT", "it does not exist"),
        ("ENAMETOOLONG", "the name is too long"),
    )
    if hasattr(errno, name)
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: what failed on which path, and what that means (``... (the disk is full)``)."""
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno)  # type: ignore[arg-type]
    hint = f" ({hint})" if hint and hint.lower() != what.lower() else ""
    if exc.filename is None:
        return f"{what}{hint}"
    return f"cannot use {os.fsdecode(exc.filename)}: {what}{hint}"


def run_cli(fn: Any) -> Any:
    """Decorator for command bodies: a user's mistake becomes a one-line message, never a traceback.

    Converted, deliberately: :class:`~headreg.errors.HeadregError` (what headreg raises on purpose: bad
    options, unreadable or corrupt files named by path, a directory in use) and ``OSError`` (a path that
    cannot be read or written: under a file, onto a folder, read-only, a full disk), named by its path.
    Anything else is a bug: its traceback is kept, after one line asking to report it.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import HeadregError

        try:
            return fn(*args, **kwargs)
        except HeadregError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(os_error_message(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception:  # not converted: only the line asking for a report is added, the traceback stays
            click.echo(REPORT_BUG, err=True)
            raise

    return wrapper
