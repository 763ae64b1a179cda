"""Plugin discovery: a pluggy ``PluginManager`` fed by the ``headreg`` entry-point group.

Loading is lazy (the registry calls :func:`get_plugin_manager` on first use) and
idempotent. Each plugin is imported and its hook called on its own, so one that fails
to import, raises, or registers something unusable is reported and skipped while the
others still load. ``HEADREG_LOAD_PLUGINS=a,b`` (empty: none) limits which entry points
load; ``HEADREG_BLOCK_PLUGINS=c`` blocks some. Both take entry-point or distribution names.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import threading
import warnings
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

__all__ = ["PluginInfo", "get_plugin_manager", "plugin_infos", "reset_plugins", "BUILTIN", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "headreg"
BUILTIN = "builtin"

_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}


@dataclass
class PluginInfo:
    """What headreg knows of one plugin.

    Attributes:
        name: the entry-point name (``"builtin"`` for headreg's own heads).
        distribution: the installed distribution that declared it, if any.
        version: that distribution's version.
        module: the module path the entry point points at.
        heads: names the plugin registered.
        error: why it was skipped, or None.
        blocked: skipped on purpose by an environment variable.
        blocked_by: that variable (``HEADREG_BLOCK_PLUGINS`` or ``HEADREG_LOAD_PLUGINS``), when blocked.
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    heads: list[str] = field(default_factory=list)
    error: str | None = None
    blocked: bool = False
    blocked_by: str | None = None

    @property
    def origin(self) -> str:
        """``"built-in"``, or the distribution (else entry-point) name."""
        return "built-in" if self.name == BUILTIN else (self.distribution or self.name)


def _canonical(name: str) -> str:
    """PEP 503 normalisation, so ``headreg_examples`` and ``headreg-examples`` are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {_canonical(part.strip()) for part in value.split(",") if part.strip()}


def _report(info: PluginInfo) -> None:
    warnings.warn(f"headreg plugin '{info.name}' ({info.origin}) skipped: {info.error}", RuntimeWarning, stacklevel=5)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and loaded on first call."""
    global _manager
    with _lock:
        if _manager is None:
            _manager, infos = _load()
            _infos.clear()
            _infos.update(infos)
        return _manager


def plugin_infos() -> dict[str, PluginInfo]:
    """Every plugin seen (loaded, failed or blocked), by name; loads plugins if needed."""
    get_plugin_manager()
    return dict(_infos)


def reset_plugins() -> None:
    """Forget loaded plugins so the next use rediscovers them (tests, notebooks).

    The registry notices on its next lookup: it collected from the manager this drops.
    """
    global _manager
    with _lock:
        _manager = None
        _infos.clear()


def _load() -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    from .heads import _builtin

    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(_builtin, name=BUILTIN)
    infos = {
        BUILTIN: PluginInfo(name=BUILTIN, distribution="headreg", version=_own_version(), module=_builtin.__name__)
    }

    allow = _env_list("HEADREG_LOAD_PLUGINS")
    block = _env_list("HEADREG_BLOCK_PLUGINS") or set()
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
            module=ep.value,
        )
        if ep.name in infos:  # two distributions with one entry-point name
            info.error = f"entry point name '{ep.name}' is already used by {infos[ep.name].origin}"
            infos[f"{ep.name} ({info.distribution})"] = info
            continue
        infos[ep.name] = info
        names = {_canonical(n) for n in (ep.name, info.distribution) if n}
        if (allow is not None and not names & allow) or names & block:
            info.blocked = True
            info.blocked_by = "HEADREG_BLOCK_PLUGINS" if names & block else "HEADREG_LOAD_PLUGINS"
            pm.set_blocked(ep.name)
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code is reported, not raised
            info.error = f"failed to load: {type(exc).__name__}: {exc}"
            _report(info)
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            # A plugin with a misspelt hook: name it and drop it, keep the rest.
            name = pm.get_name(exc.plugin)
            if name is None or name == BUILTIN:
                raise
            pm.unregister(name=name)
            infos[name].error = f"invalid plugin: {exc}"
            _report(infos[name])
    return pm, infos


def _own_version() -> str:
    from ._version import __version__

    return __version__
