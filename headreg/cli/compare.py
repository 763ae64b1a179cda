"""``headreg compare``: one model per head on the same budget, a figure of their features and a table."""

from __future__ import annotations

import json
from typing import Any

import click

from . import run_cli
from ._options import LazyChoice, data_dir_default, drop_none, engine_option, keyword_defaults, train_config_defaults
from .train import parse_key_values, visible_warnings


def _compare_defaults() -> dict[str, Any]:
    from ..compare import DEFAULT_HEADS, run_compare

    return {**keyword_defaults(run_compare), "heads": DEFAULT_HEADS}


def _presets() -> list[str]:
    from ..compare import PRESETS

    return list(PRESETS)


def _per_head_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from ..errors import InvalidValueError
    from ..registry import head_key

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, kv = item.partition(":")
        if not sep or not head.strip():
            raise InvalidValueError(
                f"--head-option must look like HEAD:KEY=VALUE (e.g. cosface:margin=0.1), got {item!r}"
            )
        out.setdefault(head_key(head), {}).update(parse_key_values([kv], "--head-option"))
    return out


@click.command("compare")
@engine_option("--heads", defaults=_compare_defaults, help="Comma-separated heads to train.")
@click.option("--dataset", default="mnist", show_default=True)
@engine_option("--embedding-dim", type=int, defaults=_compare_defaults)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@engine_option("--preset", type=LazyChoice(_presets), defaults=_compare_defaults)
@click.option("--overwrite", is_flag=True, help="Replace a comparison already in --out.")
@click.option("--head-option", multiple=True, metavar="HEAD:KEY=VALUE", help="Override a head's 2-D setting.")
@click.option("--epochs", type=int, help="Override the preset's epochs.")
@click.option("--limit", type=int, help="Override the preset's training-set size.")
@click.option("--batch-size", type=int, help="Override the preset's batch size.")
@click.option("--test-limit", type=int, help="Evaluate on a seeded subset of N test samples.")
@click.option("--model", help="Override the preset's backbone.")
@click.option("--model-option", multiple=True, metavar="KEY=VALUE", help="Override the preset's backbone arguments.")
@engine_option("--device", defaults=train_config_defaults)
@engine_option("--seed", type=int, defaults=train_config_defaults)
@engine_option("--data-dir", type=click.Path(file_okay=False), help="Dataset root.", default_text=data_dir_default)
@engine_option("--progress/--no-progress", defaults=_compare_defaults)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@run_cli
def compare_cmd(
    heads: str | None,
    dataset: str,
    embedding_dim: int | None,
    out: str,
    preset: str | None,
    overwrite: bool,
    head_option: tuple[str, ...],
    epochs: int | None,
    limit: int | None,
    batch_size: int | None,
    test_limit: int | None,
    model: str | None,
    model_option: tuple[str, ...],
    device: str | None,
    seed: int | None,
    data_dir: str | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Train one model per head (same backbone, data, seed, budget) and compare their features.

    Writes OUT/<head>/ (a full `headreg train` run per head), OUT/compare.png (the test features per
    head; angular heads also normalised onto the unit circle), OUT/compare.md and OUT/compare.json
    (test accuracy, precision@1, MAP@R, NMI, training time).
    """
    from ..compare import DEFAULT_HEADS, compare_table, run_compare

    # compare.json records device, seed and data_dir even where they are TrainConfig's defaults.
    recorded = {name: train_config_defaults()[name] for name in ("device", "seed", "data_dir")}
    overrides = {**recorded, **drop_none({"device": device, "seed": seed, "data_dir": data_dir})}
    overrides |= drop_none(
        {"epochs": epochs, "limit": limit, "batch_size": batch_size, "test_limit": test_limit, "model": model}
    )
    if model is not None or model_option:  # another backbone does not inherit the preset's arguments
        overrides["model_options"] = parse_key_values(model_option, "--model-option")
    names = [h for h in heads.split(",") if h.strip()] if heads is not None else list(DEFAULT_HEADS)
    with visible_warnings():
        entries = run_compare(
            names,
            dataset,
            out,
            overwrite=overwrite,
            head_options=_per_head_options(head_option),
            overrides=overrides,
            **drop_none({"embedding_dim": embedding_dim, "preset": preset, "progress": progress}),
        )
    if as_json:
        click.echo(json.dumps([e.row() for e in entries], indent=2))
    else:
        click.echo(compare_table(entries))
        click.echo(f"figure: {out}/compare.png")
