"""``headreg train``: train a backbone with a loss head and write a run directory."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from typing import Any

import click

from . import run_cli

__all__ = ["train_cmd", "parse_key_values", "visible_warnings"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_value(text: str) -> Any:
    """JSON-ish: numbers, true/false/null (also True/False/None), lists and objects in JSON; else the string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.strip().lower() in lowered:
        return lowered[text.strip().lower()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: tuple[str, ...] | list[str], option: str) -> dict[str, Any]:
    """``("scale=30", "margin=0.2", "widths=[16,32,64]")`` → ``{"scale": 30, "margin": 0.2, "widths": [16, 32, 64]}``.

    Args:
        items: ``key=value`` strings.
        option: the option's name, for messages (``--head-option``).
    """
    from ..errors import InvalidValueError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not _KEY.match(key):
            raise InvalidValueError(f"{option} must look like key=value (e.g. margin=0.2), got {item!r}")
        out[key] = _parse_value(value.strip())
    return out


def parse_warmup(items: tuple[str, ...] | list[str]) -> dict[str, list[float]]:
    """``("scale=1:0.7", "margin=0:0.5")`` → ``{"scale": [1.0, 0.7], "margin": [0.0, 0.5]}``."""
    from ..errors import InvalidValueError

    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        start, colon, fraction = value.partition(":")
        try:
            if not (sep and colon and _KEY.match(name.strip())):
                raise ValueError
            out[name.strip()] = [float(start), float(fraction)]
        except ValueError:
            raise InvalidValueError(
                f"--head-warmup must look like NAME=START:FRACTION (e.g. margin=0:0.5), got {item!r}"
            ) from None
    return out


@contextlib.contextmanager
def visible_warnings() -> Iterator[None]:
    """Show headreg's training warnings raised inside the block as plain ``warning: ...`` lines on stderr."""
    from ..engine._feasibility import TrainingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", TrainingWarning)
        original = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if issubclass(category, TrainingWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@click.command("train")
@click.option("--model", help="Backbone: a timm name, torchvision/<name>, lenetpp or lenetpp_bn.")
@click.option("--head", help="Loss head (`headreg list` shows them, plugins included).")
@click.option("--dataset", help="mnist, fashion-mnist, cifar10, cifar100, fake or imagefolder:PATH.")
@click.option("--embedding-dim", type=int, help="Embedding width D (default: the backbone's).")
@click.option("--num-classes", type=int, help="Classes of the head (default: the training set's).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Global batch (split over ranks).")
@click.option("--lr", type=float, help="Base learning rate [default: 0.1 for sgd, 1e-3 for adamw].")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@click.option("--head-option", "head_option", multiple=True, metavar="KEY=VALUE", help="Head option, repeatable.")
@click.option(
    "--head-lr-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Learning-rate multiplier of the head and the embedding layer.",
)
@click.option(
    "--head-warmup",
    "head_warmup",
    multiple=True,
    metavar="NAME=START:FRACTION",
    help="Ramp a head attribute (scale, margin) linearly from START to its value over FRACTION of the run.",
)
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE", help="Backbone argument.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision [default: on for CUDA].")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random shifts (and flips).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, help="Train on a seeded random subset of N samples.")
@click.option("--test-limit", type=int, help="Evaluate on a seeded random subset of N test samples.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Dataset root [default: $HEADREG_DATA_DIR].")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--max-steps", type=int, help="Stop (resumably) after this many steps in total.")
@click.option("--progress/--no-progress", default=True, help="Progress bars and per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.pass_context
@run_cli
def train_cmd(ctx: click.Context, **kw: Any) -> None:
    """Train --model with --head on --dataset and write --out.

    The run directory gets run.json (this run), model.safetensors + config.json (for
    `headreg eval --checkpoint` and headreg.load_model), metrics.jsonl (one line per epoch),
    eval.json (final test metrics) and resume.* (Ctrl-C stops cleanly; --resume continues).
    Under `torchrun --nproc_per_node=N -m headreg train ...` it trains with DDP.
    """
    from ..engine.runtime import cleanup_distributed

    try:
        with visible_warnings():
            result = _run(ctx, kw)
    finally:
        cleanup_distributed()
    if result is None:
        return
    if result.status == "stopped":
        click.echo(f"stopped at step {result.global_step}; continue with `headreg train --resume {result.run_dir}`")
        if kw["max_steps"] is None:
            ctx.exit(130)
        return
    if kw["as_json"]:
        click.echo(json.dumps({"run_dir": str(result.run_dir), "history": result.history, "eval": result.eval}))
    else:
        click.echo(f"done: {result.run_dir} (test accuracy {result.test_accuracy:.4f})")


def _run(ctx: click.Context, kw: dict[str, Any]) -> Any:
    from ..engine.runtime import is_main_process
    from ..engine.train import TrainConfig, resume, train
    from ..errors import InvalidValueError

    if kw["resume_dir"]:
        given = [
            name
            for name in ("model", "head", "dataset", "embedding_dim", "batch_size", "lr", "optimizer", "head_option")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            click.echo(f"warning: --resume takes the run's own settings; ignoring {flags}", err=True)
        epochs = kw["epochs"] if ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE else None
        device = kw["device"] if ctx.get_parameter_source("device") == click.core.ParameterSource.COMMANDLINE else None
        result = resume(
            kw["resume_dir"], epochs=epochs, device=device, stop_after_steps=kw["max_steps"], progress=kw["progress"]
        )
        return result if is_main_process() else None
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "head", "dataset", "out") if not kw[n]]
    if missing:
        raise InvalidValueError(f"headreg train needs {', '.join(missing)} (or --resume RUN_DIR)")
    config = TrainConfig(
        model=kw["model"],
        head=kw["head"],
        dataset=kw["dataset"],
        embedding_dim=kw["embedding_dim"],
        num_classes=kw["num_classes"],
        model_options=parse_key_values(kw["model_option"], "--model-option"),
        head_options=parse_key_values(kw["head_option"], "--head-option"),
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        weight_decay=kw["weight_decay"],
        optimizer=kw["optimizer"],
        momentum=kw["momentum"],
        schedule=kw["schedule"],
        warmup_epochs=kw["warmup_epochs"],
        head_lr_scale=kw["head_lr_scale"],
        head_warmup=parse_warmup(kw["head_warmup"]),
        amp=kw["amp"],
        device=kw["device"],
        seed=kw["seed"],
        limit=kw["limit"],
        test_limit=kw["test_limit"],
        augment=kw["augment"],
        data_dir=kw["data_dir"],
    )
    result = train(
        config, kw["out"], overwrite=kw["overwrite"], stop_after_steps=kw["max_steps"], progress=kw["progress"]
    )
    return result if is_main_process() else None
