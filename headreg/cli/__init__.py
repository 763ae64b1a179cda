"""The ``headreg`` command line.

Each command lives in its own module, imported only when listed or run; nothing here
imports torch at module level, so ``headreg --help`` and ``headreg --version`` are fast.
"""

from __future__ import annotations

import importlib
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


def run_cli(fn: Any) -> Any:
    """Decorator for command bodies: headreg errors become clean messages, never tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import HeadregError

        try:
            return fn(*args, **kwargs)
        except HeadregError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper
