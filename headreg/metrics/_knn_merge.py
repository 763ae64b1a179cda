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


def merge_ranked(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """Merge per-part neighbours into each query's exact `k_r` nearest, best first.

    Args:
        indices: one `(rows, L_p)` int64 tensor per part, the parts in the order of their (disjoint) index
            ranges: global gallery indices, each row ranked by the tie rule, padded with `-1`.
        values: the matching `(rows, L_p)` similarities, padded with `-inf`.
        k: `(rows,)` int64 neighbours wanted per query (at most the valid entries of its row, all parts together).

    Returns:
        `(rows, max(k))` int64 global indices, ordered by similarity descending then index ascending,
        padded with `-1` past `k_r`.
    """
    rows = k.shape[0]
    k_max = int(k.max()) if rows else 0
    keep = torch.arange(k_max, device=k.device) < k.unsqueeze(1)
    if len(indices) == 1:
        best = indices[0][:, :k_max]
    else:
        # Laid side by side in the parts' order, equal similarities already stand in ascending index order
        # (within a part by its ranking, across parts by their ranges), so one stable sort by similarity
        # descending gives the tie rule; the padding (-inf) sorts last.
        val = torch.cat(list(values), dim=1)
        order = torch.sort(val, dim=1, descending=True, stable=True).indices[:, :k_max]
        best = torch.cat(list(indices), dim=1).gather(1, order)
    return torch.where(keep & (best >= 0), best, torch.full_like(best, -1))
