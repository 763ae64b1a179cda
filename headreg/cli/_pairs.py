"""``headreg eval`` on face pairs: a pair-embeddings file (``issame`` key) through the pairs protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["from_pairs_file"]


def from_pairs_file(path: Path, gallery: Path | None, metrics: tuple[str, ...] | None, device: Any) -> Any:
    """Evaluate a pair-embeddings file (``embeddings`` 2P x D interleaved, ``issame`` P) by the pairs protocol.

    Args:
        path: The ``--embeddings`` file.
        gallery: ``--gallery-embeddings``, which a pairs file cannot take.
        metrics: Parsed ``--metrics``, or None.
        device: Where to compute.

    Returns:
        An :class:`~headreg.engine.evaluate.EvalResult` with ``issame``.
    """
    import torch

    from headreg.data._pairs import load_pair_embeddings
    from headreg.engine._pairs import evaluate_pair_embeddings, pairs_info
    from headreg.engine.evaluate import EvalResult, broadcast_from_main

    if gallery is not None:
        raise click.UsageError(f"{path} holds pairs (issame); it takes no --gallery-embeddings")
    data = load_pair_embeddings(path)
    emb, issame = data["embeddings"], data["issame"]
    values, warnings = broadcast_from_main(
        lambda: evaluate_pair_embeddings(emb.to(device), issame.to(device), metrics=metrics)
    )
    metadata = {f"file_{k}": v for k, v in data["metadata"].items()}
    info = {"source": str(path), **metadata, **pairs_info(emb, issame), "device": str(device)}
    labels = torch.arange(emb.shape[0]) // 2
    return EvalResult(values, emb, labels, info=info, warnings=warnings, issame=issame)
