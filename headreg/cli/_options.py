"""Options whose defaults and choices belong to the engine, not to the CLI.

An option that feeds an engine parameter defaults to None, and the command drops None values
before the call (as timm's ``create_model`` drops None keyword arguments), so the engine's own
default applies: the one in :class:`~headreg.engine.train.TrainConfig` or in a function's
signature. ``--help`` still shows that default, read from the same place when the help is
rendered, and :class:`LazyChoice` reads its choices from an engine constant when first needed.
Both stay lazy because ``headreg --help`` imports every command module and must not import torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
from click.core import ParameterSource

__all__ = [
    "LazyChoice",
    "EngineOption",
    "engine_option",
    "train_config_defaults",
    "keyword_defaults",
    "given_options",
    "flag_of",
    "drop_none",
    "dataset_names",
    "data_dir_default",
]


class LazyChoice(click.Choice):
    """A :class:`click.Choice` whose choices come from ``source()`` the first time they are needed.

    Args:
        source: returns the choices, e.g. ``lambda: OPTIMIZERS`` after a lazy import.
        case_sensitive: as :class:`click.Choice`.
    """

    def __init__(self, source: Callable[[], Iterable[str]], case_sensitive: bool = True) -> None:
        # click.Choice.__init__ would store the choices now; they are read on first use instead.
        self._source = source
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._source())
        return self._choices

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._choices = tuple(value)


class EngineOption(click.Option):
    """An option that defaults to None and shows the engine's default in ``--help``.

    Args:
        defaults: returns ``{parameter name: default}`` of the engine call the option feeds; the
            option's own name is looked up in it (see :func:`train_config_defaults`).
        default_text: returns the ``[default: ...]`` text instead, for a None default whose meaning
            needs words (``--lr``: one value per optimiser).
        help_text: returns the help text, for help that lists engine names (datasets, metric families).
    """

    def __init__(
        self,
        *args: Any,
        defaults: Callable[[], Mapping[str, Any]] | None = None,
        default_text: Callable[[], str] | None = None,
        help_text: Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("default") is not None:
            raise TypeError("an EngineOption takes its default from the engine; drop default=")
        # Explicitly None: click would otherwise turn an unset --flag/--no-flag pair into False.
        super().__init__(*args, default=None, **{k: v for k, v in kwargs.items() if k != "default"})
        self._defaults = defaults
        self._default_text = default_text
        self._help_text = help_text

    def engine_default(self) -> Any:
        """The engine's default for this option (None when it has none or it is not known)."""
        return None if self._defaults is None else self._defaults().get(self.name or "")

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        if self._help_text is not None:
            self.help = self._help_text()
        return super().get_help_record(ctx)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        text = self._default_text() if self._default_text is not None else self._format(self.engine_default())
        if text:
            extra["default"] = text
        return extra

    def _format(self, value: Any) -> str | None:
        if value is None or (isinstance(value, (dict, list, tuple)) and not value):
            return None  # "none given" needs no saying
        if self.is_bool_flag and self.secondary_opts:  # as click shows a flag pair: the name that is on
            return (self.opts if value else self.secondary_opts)[0].lstrip("-")
        if isinstance(value, (tuple, list)):  # in the comma-separated form the option reads
            return ",".join(str(v) for v in value)
        return str(value)


def engine_option(*param_decls: str, **attrs: Any) -> Callable[[Any], Any]:
    """``click.option`` with :class:`EngineOption`; the option's name must be the engine parameter's."""
    return click.option(*param_decls, cls=EngineOption, **attrs)


@functools.cache
def train_config_defaults() -> Mapping[str, Any]:
    """``{field: default}`` of :class:`~headreg.engine.train.TrainConfig` (factory defaults built once)."""
    from ..engine._config import TrainConfig

    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{parameter: default}`` of ``fn``'s parameters that have one."""
    params = inspect.signature(fn).parameters.items()
    return {name: p.default for name, p in params if p.default is not inspect.Parameter.empty}


def given_options(ctx: click.Context) -> list[click.Parameter]:
    """The command's parameters the user set (command line, environment or default map), in declaration order."""
    return [
        p
        for p in ctx.command.params
        if p.name is not None and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)
    ]


def flag_of(ctx: click.Context, param: click.Parameter) -> str:
    """The flag the user would recognise for ``param``: ``--no-augment`` when that is what they gave."""
    if isinstance(param, click.Option) and param.is_bool_flag and param.secondary_opts:
        if ctx.params.get(param.name or "") is False:
            return param.secondary_opts[0]
    return param.opts[0]


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the options left unset (None, or no use of a repeatable option), so engine defaults apply."""
    return {k: v for k, v in values.items() if v is not None and v != ()}


def data_dir_default() -> str:
    """Where datasets are looked for without ``--data-dir``: the environment variable :mod:`headreg.data` reads."""
    from ..data import DATA_DIR_ENV

    return f"${DATA_DIR_ENV}"


def dataset_names() -> str:
    """The dataset names :func:`headreg.data.create_dataset` accepts, for help and messages."""
    from ..data import list_datasets

    names = list_datasets()
    # the ones that take a path
    with_path = {"bin": "bin:PATH", "imagefolder": "imagefolder:PATH", "lfw": "lfw:DIR", "pairs": "pairs:LIST.csv"}
    with_path.update(ijbb="ijbb:DIR", ijbc="ijbc:DIR")
    with_path["rec"] = "rec:DIR"
    return ", ".join([n for n in names if n not in with_path] + [with_path[n] for n in names if n in with_path])
