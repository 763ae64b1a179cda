"""The registry and plugin loading: wildcards, errors, fake entry points, env-var lists, duplicates."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
import torch

import headreg
from headreg.errors import DuplicateHeadError, HeadregError, PluginError, UnknownHeadError

GOOD = """
import torch
import torch.nn.functional as F
import headreg

class FakeFace(torch.nn.Module):
    '''A plain module that keeps the head contract.'''
    def __init__(self, in_features, num_classes, scale=2.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, in_features))
        self.scale = scale
    def forward(self, embeddings, labels=None):
        logits = self.scale * F.linear(embeddings, self.weight)
        if labels is None:
            return logits
        return headreg.HeadOutput(loss=F.cross_entropy(logits, labels), logits=logits)

@headreg.hookimpl
def register_heads(register):
    register("fakeface", FakeFace)
"""
BROKEN_IMPORT = "raise ImportError('no module named missing_dependency')\n"
RAISES = """
import headreg
@headreg.hookimpl
def register_heads(register):
    raise RuntimeError('boom in hook')
"""
NOT_A_HEAD = """
import headreg
@headreg.hookimpl
def register_heads(register):
    register("notahead", object)
"""
DUPLICATE = """
import torch
import headreg
class OtherArcFace(torch.nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
@headreg.hookimpl
def register_heads(register):
    register("arcface", OtherArcFace)
"""
MISSPELT = """
import headreg
@headreg.hookimpl
def register_headz(register):
    pass
"""


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch, fresh_registry):
    """Install fake plugin modules and entry points; returns a function choosing which are visible."""
    sources = {
        "good_plugin": GOOD,
        "broken_plugin": BROKEN_IMPORT,
        "raising_plugin": RAISES,
        "notahead_plugin": NOT_A_HEAD,
        "dup_plugin": DUPLICATE,
        "misspelt_plugin": MISSPELT,
    }
    for module, src in sources.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def install(*modules: str) -> None:
        eps = [importlib.metadata.EntryPoint(name=m.replace("_plugin", ""), value=m, group="headreg") for m in modules]

        def fake_entry_points(**kwargs):
            if kwargs.get("group") == "headreg":
                return importlib.metadata.EntryPoints(eps)
            return real(**kwargs)

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
        for m in modules:
            sys.modules.pop(m, None)
        fresh_registry.reset_plugins()

    return install


def test_list_heads_wildcards_and_natural_sort():
    faces = headreg.list_heads("*face")
    assert {"arcface", "cosface", "normface", "sphereface"} <= set(faces)
    assert "softmax" not in faces and faces == sorted(faces)
    assert "softmax" in headreg.list_heads(["soft*", "*face"])
    assert "arcface" not in headreg.list_heads("*face", exclude_filters="arc*")
    from headreg.registry import _natural_key

    assert sorted(["h10", "h2", "h1"], key=_natural_key) == ["h1", "h2", "h10"]


def test_unknown_head_suggests_close_matches():
    with pytest.raises(UnknownHeadError) as info:
        headreg.create_head("arcfce", 4, 3)
    msg = str(info.value)
    assert "unknown head 'arcfce'" in msg and "did you mean 'arcface'" in msg and "headreg list" in msg
    assert isinstance(info.value, LookupError) and isinstance(info.value, HeadregError)


def test_import_headreg_loads_neither_torch_nor_plugins():
    code = "import sys, headreg, headreg.plugins as p; print('torch' in sys.modules, p._manager is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_good_plugin_discovered_through_entry_points(fake_plugins):
    fake_plugins("good_plugin")
    assert "fakeface" in headreg.list_heads()
    entry = headreg.registry.get_head_entry("fakeface")
    assert entry.plugin == "good" and entry.defaults == {"scale": 2.0}
    head = headreg.create_head("fakeface", 4, 3)
    out = head(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    assert torch.isfinite(out.loss)


def test_broken_plugins_are_isolated(fake_plugins):
    fake_plugins("good_plugin", "broken_plugin", "raising_plugin", "notahead_plugin", "misspelt_plugin")
    with pytest.warns(RuntimeWarning) as record:
        heads = headreg.list_heads()
    assert "fakeface" in heads and "arcface" in heads and "notahead" not in heads
    infos = headreg.plugins.plugin_infos()
    assert "ImportError" in infos["broken"].error and "missing_dependency" in infos["broken"].error
    assert "boom in hook" in infos["raising"].error
    assert "nn.Module" in infos["notahead"].error
    assert "register_headz" in infos["misspelt"].error
    assert infos["good"].error is None and infos["good"].heads == ["fakeface"]
    warned = " ".join(str(w.message) for w in record)
    assert all(f"'{name}'" in warned for name in ("broken", "raising", "notahead", "misspelt"))
    # Asking for a head no one registered names the plugins that failed and why.
    with pytest.raises(UnknownHeadError, match="broken.*missing_dependency"):
        headreg.create_head("brokenface", 4, 3)
    # Each failure is reported once, not on every lookup.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        headreg.list_heads()


def test_duplicate_name_is_an_error_naming_both(fake_plugins):
    fake_plugins("dup_plugin")
    with pytest.warns(RuntimeWarning, match="arcface"):
        heads = headreg.list_heads()
    assert "arcface" not in heads and "cosface" in heads
    with pytest.raises(DuplicateHeadError) as info:
        headreg.create_head("arcface", 4, 3)
    msg = str(info.value)
    assert "built-in" in msg and "dup" in msg and "OtherArcFace" in msg and "ArcFaceHead" in msg


def test_block_list_and_allow_list(fake_plugins, monkeypatch):
    monkeypatch.setenv("HEADREG_BLOCK_PLUGINS", "dup")
    fake_plugins("dup_plugin", "good_plugin")
    assert {"arcface", "fakeface"} <= set(headreg.list_heads())
    assert headreg.plugins.plugin_infos()["dup"].blocked

    monkeypatch.delenv("HEADREG_BLOCK_PLUGINS")
    monkeypatch.setenv("HEADREG_LOAD_PLUGINS", "")
    fake_plugins("good_plugin")
    assert "fakeface" not in headreg.list_heads() and "arcface" in headreg.list_heads()

    monkeypatch.setenv("HEADREG_LOAD_PLUGINS", "GOOD")  # names compare PEP 503-normalised
    fake_plugins("good_plugin", "raising_plugin")
    heads = headreg.list_heads()
    infos = headreg.plugins.plugin_infos()
    assert "fakeface" in heads and infos["raising"].blocked and infos["raising"].error is None


def test_register_head_decorator(fresh_registry):
    @headreg.register_head("localface")
    class LocalFace(torch.nn.Module):
        def __init__(self, in_features, num_classes, margin=0.1):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(num_classes, in_features))

    try:
        assert "localface" in headreg.list_heads()
        assert headreg.registry.get_head_entry("localface").origin.startswith("local")
        assert headreg.create_head("localface", 3, 2, margin=0.2).weight.shape == (2, 3)
        with pytest.raises(DuplicateHeadError, match="built-in"):

            @headreg.register_head("cosface")
            class Clash(torch.nn.Module):
                def __init__(self, in_features, num_classes):
                    super().__init__()

        with pytest.raises(PluginError, match="in_features, num_classes"):

            @headreg.register_head("noargs")
            class NoArgs(torch.nn.Module):
                def __init__(self):
                    super().__init__()
    finally:
        headreg.registry.unregister_head("localface")
    assert "localface" not in headreg.list_heads()


def test_cli_list_and_plugins(fake_plugins):
    from click.testing import CliRunner

    from headreg.cli import main

    fake_plugins("good_plugin", "raising_plugin")
    runner = CliRunner()
    with pytest.warns(RuntimeWarning, match="plugin 'raising' .* skipped: RuntimeError: boom"):  # as documented
        result = runner.invoke(main, ["list"])
    assert result.exit_code == 0
    assert "arcface" in result.output and "built-in" in result.output and "fakeface" in result.output
    result = runner.invoke(main, ["list", "*face", "--json"])
    import json

    rows = json.loads(result.output)
    arc = next(r for r in rows if r["name"] == "arcface")
    assert arc["defaults"] == {"scale": 64.0, "margin": 0.5, "easy_margin": False}
    assert all(r["name"].endswith("face") for r in rows)
    result = runner.invoke(main, ["plugins", "--json"])
    plugins = {p["name"]: p for p in json.loads(result.output)}
    assert plugins["builtin"]["status"] == "ok" and "arcface" in plugins["builtin"]["heads"]
    assert plugins["raising"]["status"] == "error" and "boom in hook" in plugins["raising"]["error"]


def test_cli_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from headreg.cli import main\n"
        "for args in (['--help'], ['--version'], ['list', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out and "0.1.0" in out


def test_example_plugin_package_is_discovered_for_real(fresh_registry):
    """plugins/headreg-examples, installed by the README's set-up, found through its entry point."""
    try:
        importlib.metadata.distribution("headreg-examples")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("headreg-examples is not installed; run the README's set-up (pip install -e plugins/...)")
    heads = headreg.list_heads()
    assert {"adaface", "curricularface", "subcenter_arcface"} <= set(heads)
    assert headreg.registry.get_head_entry("adaface").origin == "headreg-examples"
    infos = headreg.plugins.plugin_infos()
    assert infos["examples"].distribution == "headreg-examples"
    assert infos["examples"].module == "headreg_examples.plugin"
