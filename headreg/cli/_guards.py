"""Checks of command-line values that the engine would only reject late or in torch's words.

Each names the option: an output path that cannot be written (checked before the work, so a long
evaluation is not lost to a typo) and an ``--input-size`` too small for the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

__all__ = ["check_input_size", "check_output_paths"]


def check_output_paths(paths: Iterable[tuple[str, Path | None]]) -> None:
    """Refuse an output path that cannot be written before the work runs, naming the option.

    A folder given as a file, a file where a folder is needed, or a folder without write permission would
    otherwise fail only after the evaluation, with an OS message that names no option.

    Args:
        paths: ``(option, path)`` pairs; a None path is an option not given.
    """
    for flag, path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise click.BadParameter(f"{path} is a folder; give a file name", param_hint=flag)
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise click.BadParameter(f"cannot write {path}: {parent} is a file, not a folder", param_hint=flag)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise click.BadParameter(f"cannot write {path}: no permission to write in {parent}", param_hint=flag)


def check_input_size(model: Any, size: int | tuple[int, ...] | None) -> None:
    """Refuse an ``--input-size`` the backbone cannot run, naming the smallest square size it can.

    Probed on one blank image (cheap at the small sizes where this fails), so the user gets a clear
    message before any data is read, not torch's error about kernel sizes from inside the backbone.
    """
    if size is None:
        return
    import torch

    dims = (size, size) if isinstance(size, int) else tuple(size)
    chans = dims[0] if len(dims) == 3 else int(model.pretrained_cfg.get("input_size", (3,))[0])
    h, w = dims[-2:]

    def runs(height: int, width: int) -> str | None:
        try:
            with torch.no_grad():
                model.embed(torch.zeros(1, chans, height, width))
        except (RuntimeError, ValueError) as exc:  # what torch raises for a map that shrinks to nothing
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None

    was_training = model.training
    model.eval()
    try:
        error = runs(h, w)
        if error is None:
            return
        low, high = max(h, w), max(h, w)
        while high <= 1024 and runs(high, high) is not None:
            low, high = high, high * 2
        if high > 1024:
            raise click.BadParameter(
                f"the model cannot run on {chans}x{h}x{w} images: {error}", param_hint="--input-size"
            )
        while high - low > 1:  # the smallest square size that runs, between a failing and a working one
            mid = (low + high) // 2
            low, high = (low, mid) if runs(mid, mid) is None else (mid, high)
        raise click.BadParameter(
            f"{h}x{w} is too small for this backbone: it needs at least {high}x{high} pixels", param_hint="--input-size"
        )
    finally:
        model.train(was_training)
