"""Write docs/cli.md from the CLI's own --help, so the reference cannot drift from the code.

.venv/bin/python scripts/gen_cli_docs.py          # rewrite docs/cli.md
.venv/bin/python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale (the tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from headreg.cli import COMMANDS, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    parts = [
        "# Command-line reference\n",
        "Generated from `headreg --help` by `scripts/gen_cli_docs.py`; a test fails when it is stale.\n",
    ]
    ctx = click.Context(main, info_name="headreg", terminal_width=100, max_content_width=100)
    parts.append("## headreg\n\n```text\n" + main.get_help(ctx) + "\n```\n")
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        if cmd is None:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=100, max_content_width=100)
        parts.append(f"## headreg {name}\n\n```text\n" + cmd.get_help(sub) + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
