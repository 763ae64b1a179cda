"""``headreg compare``: one model per head on the same budget, a figure of their features and a table."""

from __future__ import annotations

import json
from typing import Any

import click

from . import run_cli
from .train import parse_key_values, visible_warnings

DEFAULT_HEADS = "softmax,modified_softmax,normface,sphereface,arcface,cosface,center"


def _per_head_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from ..errors import InvalidValueError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, kv = item.partition(":")
        if not sep or not head.strip():
            raise InvalidValueError(
                f"--head-option must look like HEAD:KEY=VALUE (e.g. cosface:margin=0.1), got {item!r}"
            )
        out.setdefault(head.strip().lower().replace("-", "_"), {}).update(parse_key_values([kv], "--head-option"))
    return out


@click.command("compare")
@click.option("--heads", default=DEFAULT_HEADS, show_default=True, help="Comma-separated heads to train.")
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--embedding-dim", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a comparison already in --out.")
@click.option("--head-option", multiple=True, metavar="HEAD:KEY=VALUE", help="Override a head's 2-D setting.")
@click.option("--epochs", type=int, help="Override the preset's epochs.")
@click.option("--limit", type=int, help="Override the preset's training-set size.")
@click.option("--batch-size", type=int, help="Override the preset's batch size.")
@click.option("--test-limit", type=int, help="Evaluate on a seeded subset of N test samples.")
@click.option("--model", help="Override the preset's backbone.")
@click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="Override the preset's backbone arguments.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Dataset root [default: $HEADREG_DATA_DIR].")
@click.option("--progress/--no-progress", default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@run_cli
def compare_cmd(**kw: Any) -> None:
    """Train one model per head (same backbone, data, seed, budget) and compare their features.

    Writes OUT/<head>/ (a full `headreg train` run per head), OUT/compare.png (the test
    features per head; angular heads also normalised onto the unit circle), OUT/compare.md
    and OUT/compare.json (test accuracy, precision@1, MAP@R, NMI, training time).
    """
    from ..compare import compare_table, run_compare

    overrides: dict[str, Any] = {"device": kw["device"], "seed": kw["seed"], "data_dir": kw["data_dir"]}
    for key in ("epochs", "limit", "batch_size", "test_limit", "model"):
        if kw[key] is not None:
            overrides[key] = kw[key]
    if kw["model"] is not None or kw["model_option"]:
        overrides["model_options"] = parse_key_values(kw["model_option"], "--model-option")
    with visible_warnings():
        entries = run_compare(
            [h for h in kw["heads"].split(",") if h.strip()],
            kw["dataset"],
            kw["out"],
            embedding_dim=kw["embedding_dim"],
            preset=kw["preset"],
            overwrite=kw["overwrite"],
            head_options=_per_head_options(kw["head_option"]),
            overrides=overrides,
            progress=kw["progress"],
        )
    if kw["as_json"]:
        click.echo(json.dumps([e.row() for e in entries], indent=2))
    else:
        click.echo(compare_table(entries))
        click.echo(f"figure: {kw['out']}/compare.png")
