"""``headreg train``: train a backbone with a loss head and write a run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

from . import run_cli
from ._options import (
    LazyChoice,
    data_dir_default,
    dataset_names,
    drop_none,
    engine_option,
    flag_of,
    given_options,
    keyword_defaults,
    train_config_defaults,
)

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
    from ..engine.train import TrainingWarning

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


def _optimizers() -> tuple[str, ...]:
    from ..engine._optim import OPTIMIZERS

    return OPTIMIZERS


def _schedules() -> tuple[str, ...]:
    from ..engine._optim import SCHEDULES

    return SCHEDULES


def _default_lr() -> str:
    from ..engine._optim import DEFAULT_LR

    return ", ".join(f"{lr:g} for {name}" for name, lr in DEFAULT_LR.items())


def _run_defaults() -> dict[str, Any]:
    from ..engine.train import train

    return keyword_defaults(train)


def config_option(*param_decls: str, **attrs: Any) -> Callable[[Any], Any]:
    """An option feeding the :class:`~headreg.engine.train.TrainConfig` field of its name (default: the field's)."""
    return engine_option(*param_decls, defaults=train_config_defaults, **attrs)


#: Options given as text and parsed into their TrainConfig field's type when the command runs, so that a
#: malformed one is a clean error (and one that --resume ignores is not parsed at all).
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "model_options": lambda items: parse_key_values(items, "--model-option"),
    "head_options": lambda items: parse_key_values(items, "--head-option"),
    "head_warmup": parse_warmup,
}


@click.command("train")
@config_option("--model", help="Backbone: a timm name, torchvision/<name>, lenetpp or lenetpp_bn.")
@config_option("--head", help="Loss head (`headreg list` shows them, plugins included).")
@config_option("--dataset", help_text=lambda: f"Dataset: {dataset_names()}.")
@config_option("--embedding-dim", type=int, help="Embedding width D (default: the backbone's).")
@config_option("--num-classes", type=int, help="Classes of the head (default: the training set's).")
@config_option("--epochs", type=int)
@config_option("--batch-size", type=int, help="Global batch (split over ranks).")
@config_option("--lr", type=float, help="Base learning rate.", default_text=_default_lr)
@config_option("--weight-decay", type=float)
@config_option("--optimizer", type=LazyChoice(_optimizers))
@config_option("--momentum", type=float, help="SGD momentum.")
@config_option("--schedule", type=LazyChoice(_schedules))
@config_option("--warmup-epochs", type=float)
@config_option("--head-option", "head_options", multiple=True, metavar="KEY=VALUE", help="Head option, repeatable.")
@config_option("--head-lr-scale", type=float, help="Learning-rate multiplier of the head and the embedding layer.")
@config_option(
    "--head-warmup",
    multiple=True,
    metavar="NAME=START:FRACTION",
    help="Ramp a head attribute (scale, margin) linearly from START to its value over FRACTION of the run.",
)
@config_option(
    "--shard-head/--no-shard-head",
    help="Split the head's classes over the ranks (Partial FC, under torchrun; docs/scale.md).",
)
@config_option("--sample-rate", type=float, help="With --shard-head: fraction of each rank's classes per step.")
@config_option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE", help="Backbone argument.")
@config_option(
    "--pretrained-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Backbone state dict to start from (torch.save'd, e.g. insightface's backbone.pth; read weights-only).",
)
@config_option(
    "--pretrained",
    is_flag=True,
    help="Start from the backbone's pretrained weights (local cache only; never downloads).",
)
@config_option("--freeze-backbone", type=int, metavar="EPOCHS", help="Train only the neck and head for EPOCHS epochs.")
@config_option("--backbone-lr-scale", type=float, help="Learning-rate multiplier of the backbone.")
@config_option("--clip-grad-norm", type=float, help="Clip each step's total gradient 2-norm to this value.")
@config_option("--accumulate", type=int, metavar="N", help="Micro-batches of --batch-size per optimiser step.")
@config_option(
    "--max-bad-steps", type=int, help="Stop after this many non-finite steps in a row (each skipped); 0: off."
)
@config_option("--amp/--no-amp", help="Mixed precision.", default_text=lambda: "on for CUDA")
@config_option("--augment/--no-augment", help="Random shifts (and flips).")
@config_option("--device")
@config_option("--seed", type=int)
@config_option("--limit", type=int, help="Train on a seeded random subset of N samples.")
@config_option("--test-limit", type=int, help="Evaluate on a seeded random subset of N test samples.")
@config_option(
    "--input-size", type=int, help="Model input side in pixels (default: the backbone's; 224 for cub200...)."
)
@config_option("--data-dir", type=click.Path(file_okay=False), help="Dataset root.", default_text=data_dir_default)
@config_option(
    "--val",
    multiple=True,
    metavar="PROTOCOL[,PROTOCOL...]",
    help="Validate during training as `headreg eval` does: NAME.bin (face pairs, from --data-dir), "
    "DATASET[@SPLIT] (retrieval, default split test) or DATASET@QUERY/GALLERY; repeatable.",
)
@config_option("--val-every", metavar="N|Nsteps", help="Validate every N epochs, or every N steps (500steps).")
@config_option("--keep-best", metavar="[SET/]METRIC", help="Keep the best validation's model in RUN/best.")
@config_option(
    "--early-stop", type=int, metavar="PATIENCE", help="End after PATIENCE validations without a better --keep-best."
)
@config_option("--tensorboard/--no-tensorboard", help="Also write TensorBoard events to RUN/tensorboard.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--max-steps", "stop_after_steps", type=int, help="Stop (resumably) after this many steps in total.")
@click.option(
    "--no-verify",
    "verify",
    flag_value=False,
    default=None,
    help="With --resume: continue even if the state's recorded SHA-256 digest does not match.",
)
@engine_option("--progress/--no-progress", defaults=_run_defaults, help="Progress bars and per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the final result as JSON.")
@click.pass_context
@run_cli
def train_cmd(
    ctx: click.Context,
    out: str | None,
    overwrite: bool,
    resume_dir: str | None,
    stop_after_steps: int | None,
    verify: bool | None,
    progress: bool | None,
    as_json: bool,
    **config: Any,
) -> None:
    """Train --model with --head on --dataset and write --out.

    The run directory gets run.json (this run), model.safetensors + config.json (for
    `headreg eval --checkpoint` and headreg.load_model), metrics.jsonl (one line per epoch),
    eval.json (final test metrics) and resume.* (Ctrl-C stops cleanly; --resume continues).
    Under `torchrun --nproc_per_node=N -m headreg train ...` it trains with DDP.
    """
    from ..engine.runtime import cleanup_distributed, is_main_process
    from ..engine.train import TrainConfig, resume, train
    from ..errors import InvalidValueError

    # Every keyword is the engine parameter of the same name; None means "the engine's default".
    run = {"stop_after_steps": stop_after_steps, "progress": progress}
    try:
        with visible_warnings():
            if resume_dir:
                result = resume(resume_dir, **_resume_settings(ctx, {**config, **run, "verify": verify}))
            else:
                if verify is not None:
                    raise InvalidValueError("--no-verify goes with --resume: a new run has no state to verify")
                settings = drop_none(config)
                settings.update({k: parse(settings[k]) for k, parse in _PARSERS.items() if k in settings})
                missing = [_flag(ctx, f) for f in _required_fields() if f not in settings] + ([] if out else ["--out"])
                if missing:
                    raise InvalidValueError(f"headreg train needs {', '.join(missing)} (or --resume RUN_DIR)")
                result = train(TrainConfig(**settings), out, overwrite=overwrite, **drop_none(run))
            if not is_main_process():
                return
    finally:
        cleanup_distributed()
    if result.status == "stopped":
        click.echo(f"stopped at step {result.global_step}; continue with `headreg train --resume {result.run_dir}`")
        if stop_after_steps is None:
            ctx.exit(130)
        return
    if as_json:
        out = {"run_dir": str(result.run_dir), "history": result.history, "eval": result.eval}
        if result.validations:
            out.update(validations=result.validations, early_stop=result.early_stop)
        click.echo(json.dumps(out))
    else:
        last = result.history[-1] if result.history else {}
        if result.test_accuracy is None and "test_recall_at_1" in last:  # unseen test classes: retrieval
            click.echo(f"done: {result.run_dir} (test Recall@1 {last['test_recall_at_1']:.4f} on unseen classes)")
        else:
            click.echo(f"done: {result.run_dir} (test accuracy {result.test_accuracy:.4f})")


def _required_fields() -> list[str]:
    """The TrainConfig fields without a default (a new run must name them)."""
    return [name for name in _config_fields() if name not in train_config_defaults()]


def _config_fields() -> list[str]:
    from ..engine.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _flag(ctx: click.Context, name: str) -> str:
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _resume_settings(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The given options that ``resume()`` takes, by name; one warning names every other setting given.

    An option is a setting when it feeds a TrainConfig field or a parameter of ``train()``. Those that
    ``resume()`` also takes (a new epoch count, the device, the step budget, progress) apply to the
    resumed run; the rest are fixed by the run's stored config. CLI-only options (--json) are neither.
    """
    from ..engine.train import resume, train

    takes = set(inspect.signature(resume).parameters)
    settings = set(_config_fields()) | set(inspect.signature(train).parameters)
    ignored = [flag_of(ctx, p) for p in given_options(ctx) if p.name in settings - takes]
    if ignored:
        click.echo(f"warning: --resume ignores {', '.join(ignored)}: the run's own settings are used", err=True)
    return {k: v for k, v in drop_none(values).items() if k in takes}
