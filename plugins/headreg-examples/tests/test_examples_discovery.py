"""headreg finds the example heads through the ``headreg`` entry point of the installed distribution."""

from __future__ import annotations

import importlib.metadata

import headreg
import pytest
from headreg.errors import UnknownHeadError
from headreg.plugins import plugin_infos, reset_plugins
from headreg.registry import get_head_entry

try:
    _DIST = importlib.metadata.distribution("headreg-examples")
except importlib.metadata.PackageNotFoundError:
    _DIST = None

pytestmark = pytest.mark.skipif(
    _DIST is None,
    reason="headreg-examples is not installed, so there is no entry point to discover; "
    "run `pip install -e plugins/headreg-examples`",
)

NAMES = ("adaface", "curricularface", "subcenter_arcface")


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """A registry that rediscovers plugins, with no environment variable limiting them."""
    monkeypatch.delenv("HEADREG_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("HEADREG_BLOCK_PLUGINS", raising=False)
    reset_plugins()
    yield monkeypatch
    monkeypatch.undo()
    reset_plugins()


def test_heads_come_from_the_entry_point(fresh_registry):
    import headreg_examples

    names = headreg.list_heads()
    for name in NAMES:
        assert name in names
        entry = get_head_entry(name)
        assert entry.origin == "headreg-examples"
        assert entry.plugin == "examples"
        assert entry.paper.startswith("https://")
    assert get_head_entry("adaface").cls is headreg_examples.AdaFaceHead
    assert headreg.list_heads("*face") == sorted(n for n in names if n.endswith("face"))

    info = plugin_infos()["examples"]
    assert info.distribution == "headreg-examples"
    assert info.version == _DIST.version
    assert info.module == "headreg_examples.plugin"
    assert sorted(info.heads) == sorted(NAMES)
    assert info.error is None and not info.blocked


def test_create_head_by_name(fresh_registry):
    head = headreg.create_head("subcenter-arcface", 8, 4, k=2, scale=None)  # '-' and None options are normalised
    assert head.weight.shape == (8, 8)
    assert headreg.registry.head_defaults(type(head)) == {"scale": 64.0, "margin": 0.5, "k": 3}


@pytest.mark.parametrize(
    ("variable", "value"), [("HEADREG_BLOCK_PLUGINS", "headreg-examples"), ("HEADREG_LOAD_PLUGINS", "")]
)
def test_environment_can_keep_the_plugin_out(fresh_registry, variable, value):
    fresh_registry.setenv(variable, value)
    reset_plugins()
    assert not set(NAMES) & set(headreg.list_heads())
    assert "arcface" in headreg.list_heads()  # built-ins always load
    assert plugin_infos()["examples"].blocked
    with pytest.raises(UnknownHeadError, match="adaface"):
        headreg.create_head("adaface", 8, 4)


def test_load_list_names_the_entry_point(fresh_registry):
    fresh_registry.setenv("HEADREG_LOAD_PLUGINS", "examples")
    reset_plugins()
    assert set(NAMES) <= set(headreg.list_heads())
