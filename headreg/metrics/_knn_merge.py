"""The exact merge of ranked neighbour lists from disjoint parts of one gallery (gallery-sharded k-NN).

Each part (one rank's share of the gallery) ranked its own items for a chunk of queries by the
tie rule of docs/metrics.md: similarity descending, then gallery index ascending. With every
index made global (the part's offset added) and each entry carrying the similarity that ranked
it, bit for bit, the global top `K_q` is the top `K_q` of the union under the same rule: an item
in the global top `K_q` is in its own part's top `K_q`, since fewer than `K_q` items rank above it
anywhere. So the merge reproduces one process's neighbours exactly, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_ranked"]

_PAD = torch.iinfo(torch.int64).max


def merge_ranked(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """Merge per-part neighbours into each query's exact `k_r` nearest, best first.

    Args:
        indices: one `(rows, L_p)` int64 tensor per part: global gallery indices, padded with `-1`.
        values: the matching `(rows, L_p)` similarities, padded with `-inf`.
        k: `(rows,)` int64 neighbours wanted per query (at most the valid entries of its row, all parts together).

    Returns:
        `(rows, max(k))` int64 global indices, ordered by similarity descending then index ascending,
        padded with `-1` past `k_r`.
    """
    idx = torch.cat(list(indices), dim=1)
    val = torch.cat(list(values), dim=1)
    rows = idx.shape[0]
    k_max = int(k.max()) if rows else 0
    if k_max == 0:
        return torch.full((rows, 0), -1, dtype=torch.long, device=idx.device)
    # Two stable sorts give (similarity desc, index asc); padding (-1) sorts after every real index.
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, _PAD))
    order = torch.argsort(idx, dim=1, stable=True)
    idx, val = idx.gather(1, order), val.gather(1, order)
    order = torch.argsort(val, dim=1, descending=True, stable=True)[:, :k_max]
    best = idx.gather(1, order)
    keep = (torch.arange(k_max, device=idx.device) < k.unsqueeze(1)) & (best != _PAD)
    return torch.where(keep, best, torch.full_like(best, -1))
