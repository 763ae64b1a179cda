"""Name → head class, with where each came from.

Filled on first use from the plugin manager (built-in heads and entry-point plugins,
through the one ``register_heads`` hook) and from :func:`register_head` for heads
defined in-process. Nothing here runs at ``import headreg``.

The registry sits above :mod:`headreg.plugins` and reads it; the plugin manager knows nothing of the
registry. What was collected is tied to the manager it came from, so after
:func:`headreg.plugins.reset_plugins` hands out a new manager, the next lookup collects afresh.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DuplicateHeadError, InvalidValueError, PluginError, UnknownHeadError, did_you_mean
from .plugins import BUILTIN, get_plugin_manager, plugin_infos

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "HeadEntry",
    "list_heads",
    "get_head_class",
    "get_head_entry",
    "create_head",
    "register_head",
    "head_defaults",
    "head_key",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_lock = threading.RLock()
_entries: dict[str, HeadEntry] | None = None
_source: pluggy.PluginManager | None = None  # the plugin manager _entries were collected from
_conflicts: dict[str, list[HeadEntry]] = {}
_local: dict[str, HeadEntry] = {}
_warned: set[str] = set()


@dataclass(frozen=True)
class HeadEntry:
    """One registered head.

    Attributes:
        name: registry name.
        cls: the head class.
        plugin: the plugin that registered it (``"builtin"``, an entry-point name, or ``"local"``).
        origin: ``"built-in"``, the plugin's distribution name, or ``"local (module)"``.
    """

    name: str
    cls: type
    plugin: str
    origin: str

    @property
    def description(self) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(self.cls) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        return first.replace("``", "")

    @property
    def defaults(self) -> dict[str, Any]:
        """Constructor options with their defaults."""
        return head_defaults(self.cls)

    @property
    def paper(self) -> str:
        return str(getattr(self.cls, "paper", "") or "")


def head_defaults(cls: type) -> dict[str, Any]:
    """The keyword options of a head class with their defaults (``in_features``/``num_classes`` left out)."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p.default
        for name, p in params.items()
        if name not in ("self", "in_features", "num_classes")
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
    }


def _validate_head_class(name: str, cls: Any) -> None:
    """Raise PluginError unless ``cls`` can be built as ``cls(in_features, num_classes, **options)``."""
    import torch.nn as nn

    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"head name must be a lower-case identifier such as 'my_face', got {name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise PluginError(f"head '{name}' must be a torch.nn.Module subclass, got {cls!r}")
    try:
        sig = inspect.signature(cls.__init__)
        sig.bind(None, 8, 2)
    except (TypeError, ValueError) as exc:
        raise PluginError(
            f"head '{name}' ({cls.__qualname__}) must be constructible as "
            f"{cls.__name__}(in_features, num_classes): {exc}"
        ) from None


def _collect(pm: pluggy.PluginManager) -> dict[str, HeadEntry]:
    infos = plugin_infos()
    found: dict[str, list[HeadEntry]] = {}
    # Call each plugin's hook on its own: one that raises must not take the others down,
    # and the callback we hand it knows whose registrations it is receiving.
    for impl in pm.hook.register_heads.get_hookimpls():
        info = infos.get(impl.plugin_name)
        origin = info.origin if info is not None else impl.plugin_name
        staged: list[HeadEntry] = []

        def register(
            name: str,
            cls: Any,
            _staged: list[HeadEntry] = staged,
            _plugin: str = impl.plugin_name,
            _origin: str = origin,
        ) -> None:
            _validate_head_class(name, cls)
            _staged.append(HeadEntry(name=name, cls=cls, plugin=_plugin, origin=_origin))

        try:
            impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - third-party code: report and skip
            if impl.plugin_name == BUILTIN:
                raise
            msg = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PluginError) else str(exc)
            if info is not None:
                info.error = f"register_heads failed: {msg}"
            _warn_once(impl.plugin_name, f"headreg plugin '{impl.plugin_name}' ({origin}) skipped: {msg}")
            continue
        if info is not None:
            info.heads = [e.name for e in staged]
        for entry in staged:
            found.setdefault(entry.name, []).append(entry)
    for entry in _local.values():
        found.setdefault(entry.name, []).append(entry)

    entries: dict[str, HeadEntry] = {}
    _conflicts.clear()
    for name, group in found.items():
        if len(group) == 1:
            entries[name] = group[0]
        else:
            _conflicts[name] = group
            _warn_once(f"dup:{name}", _duplicate_message(name, group))
    return entries


def _duplicate_message(name: str, group: Iterable[HeadEntry]) -> str:
    sources = " and ".join(f"{e.origin} ({e.cls.__module__}.{e.cls.__qualname__})" for e in group)
    return (
        f"head '{name}' is registered by both {sources}; uninstall or block one "
        f"(HEADREG_BLOCK_PLUGINS=<plugin>) to use it"
    )


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _registry() -> dict[str, HeadEntry]:
    global _entries, _source
    with _lock:
        pm = get_plugin_manager()
        if _entries is None or pm is not _source:
            # First use, or reset_plugins() replaced the manager: what came from the old one is stale.
            _conflicts.clear()
            _warned.clear()
            _entries, _source = _collect(pm), pm
        return _entries


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_heads(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "") -> list[str]:
    """Names of the registered heads, naturally sorted, as ``timm.list_models``.

    Args:
        filter: fnmatch pattern(s) a name must match, e.g. ``"*face"``; empty keeps all.
        exclude_filters: pattern(s) that drop a name.

    Returns:
        Sorted head names (built-in and plugin).
    """
    names = list(_registry())
    includes = [filter] if isinstance(filter, str) else list(filter)
    includes = [f for f in includes if f]
    if includes:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, f) for f in includes)]
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    for pattern in (e for e in excludes if e):
        names = [n for n in names if not fnmatch.fnmatchcase(n, pattern)]
    return sorted(names, key=_natural_key)


def head_key(name: str) -> str:
    """The registry key of a head name as a user types it: ``" ArcFace "`` → ``"arcface"``, ``"a-b"`` → ``"a_b"``."""
    return name.strip().lower().replace("-", "_")


def get_head_entry(name: str) -> HeadEntry:
    """The registry entry for ``name``; raises UnknownHeadError, DuplicateHeadError or PluginError."""
    if not isinstance(name, str):
        raise UnknownHeadError(f"head name must be a string, got {name!r}")
    entries = _registry()
    key = head_key(name)
    if key in entries:
        return entries[key]
    if key in _conflicts:
        raise DuplicateHeadError(_duplicate_message(key, _conflicts[key]))
    failed = [i for i in plugin_infos().values() if i.error]
    hint = did_you_mean(key, entries)
    extra = ""
    if failed:
        # It may be a head of a plugin that failed: name the plugins and their errors.
        extra = "; it may come from a plugin that failed: " + "; ".join(f"'{i.name}': {i.error}" for i in failed)
    blocked = [i for i in plugin_infos().values() if i.blocked]
    if blocked:
        # A blocked plugin is never imported, so which heads it has is unknown: name it and the variable.
        extra += "; it may come from a plugin that is blocked: " + "; ".join(
            f"'{i.name}' (blocked by {i.blocked_by}; change that variable to load it)" for i in blocked
        )
    raise UnknownHeadError(f"unknown head '{name}'{hint} (`headreg list` shows all {len(entries)}){extra}")


def get_head_class(name: str) -> type:
    """The class registered as ``name``."""
    return get_head_entry(name).cls


def create_head(name: str, in_features: int, num_classes: int, **options: Any) -> Any:
    """Build the head registered as ``name``.

    Args:
        name: registry name, e.g. ``"arcface"``.
        in_features: embedding width ``D``.
        num_classes: number of classes ``C``.
        **options: head options such as ``scale`` and ``margin``; ``None`` values are dropped
            so CLI defaults pass through.

    Returns:
        The head module.
    """
    cls = get_head_class(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in options if k not in accepted and not takes_kwargs]
    if unknown:
        valid = ", ".join(head_defaults(cls)) or "none"
        raise InvalidValueError(
            f"head '{name}' has no option {', '.join(repr(u) for u in unknown)}"
            f"{did_you_mean(unknown[0], head_defaults(cls))} (its options: {valid})"
        )
    return cls(in_features, num_classes, **options)


def register_head(name: str | None = None) -> Callable[[type], type]:
    """Decorator that registers a head class in this process, without a package.

    Example::

        @headreg.register_head("myface")
        class MyFace(nn.Module): ...

    Args:
        name: registry name; defaults to the class name in lower case.
    """

    def decorator(cls: type) -> type:
        key = name or cls.__name__.lower()
        _validate_head_class(key, cls)
        entry = HeadEntry(name=key, cls=cls, plugin="local", origin=f"local ({cls.__module__})")
        with _lock:
            existing = _registry().get(key) or _local.get(key)
            if existing is not None and existing.cls is not cls:
                raise DuplicateHeadError(_duplicate_message(key, [existing, entry]))
            _local[key] = entry
            if _entries is not None:
                _entries[key] = entry
        return cls

    return decorator


def unregister_head(name: str) -> None:
    """Remove a head registered with :func:`register_head` (tests, notebooks)."""
    with _lock:
        _local.pop(name, None)
        if _entries is not None and name in _entries and _entries[name].plugin == "local":
            del _entries[name]
