"""Shared fixtures: the data directory, a fresh plugin registry, seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never download: point the project at the shipped data unless CI set it already.
if "HEADREG_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["HEADREG_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """A registry that rediscovers plugins now and again after the test."""
    import headreg.plugins as plugins

    monkeypatch.delenv("HEADREG_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("HEADREG_BLOCK_PLUGINS", raising=False)
    plugins.reset_plugins()
    yield plugins
    plugins.reset_plugins()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
