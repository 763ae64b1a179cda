"""``headreg list`` and ``headreg plugins``."""

from __future__ import annotations

import json
from typing import Any

import click

from . import run_cli


def _fmt_defaults(defaults: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in defaults.items())


def echo_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as a plain aligned table with the given columns."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        click.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


@click.command("list")
@click.argument("pattern", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@run_cli
def list_cmd(pattern: str, as_json: bool) -> None:
    """List the registered heads (optionally matching a wildcard PATTERN such as '*face')."""
    from ..registry import get_head_entry, list_heads

    rows = []
    for name in list_heads(pattern):
        e = get_head_entry(name)
        rows.append(
            {
                "name": name,
                "origin": e.origin,
                "description": e.description,
                "defaults": e.defaults,
                "paper": e.paper,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=repr))
        return
    for r in rows:
        r["defaults"] = _fmt_defaults(r["defaults"])
    echo_table(rows, ["name", "origin", "description", "defaults"])


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@run_cli
def plugins_cmd(as_json: bool) -> None:
    """Show each plugin: its version, the heads it gave, or the error that stopped it."""
    from ..plugins import plugin_infos
    from ..registry import list_heads

    list_heads()  # run the hooks, so each plugin's heads and errors are known
    rows = []
    for info in plugin_infos().values():
        status = "blocked" if info.blocked else ("error" if info.error else "ok")
        rows.append(
            {
                "name": info.name,
                "distribution": info.distribution or "",
                "version": info.version or "",
                "status": status,
                "heads": info.heads,
                "error": info.error or "",
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        r["heads"] = ", ".join(r["heads"])
    echo_table(rows, ["name", "distribution", "version", "status", "heads", "error"])
