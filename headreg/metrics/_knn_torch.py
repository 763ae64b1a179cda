"""k-NN back end: the torch scan, for GPUs and for what the compiled CPU scan does not take.

The same steps as `_knn_cpu`, in torch on the gallery's device (float32 or float64), usually
with the whole gallery as one tile. A candidate is a triple `(row, original index,
similarity)`; step 4 ranks the triples with one sort of packed int64 keys (`KeyLayout`) when
they fit, else with three stable sorts (float64 similarities, or more rows and items than 63
bits hold).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headreg.metrics._knn_base import KeyLayout, Layout, ScanSettings, exclude_self, first_block, tile_similarities

# (row, original index, similarity), each `(n,)`.
Triples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# The `j_r`-th largest value of each row: `_knn_base.kth_largest_numpy` or `kth_largest_torch`.
KthLargest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ordered_desc_bits(values: torch.Tensor) -> torch.Tensor:
    """Map float32 similarities to int64 in [0, 2^32) whose ascending order is descending similarity."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 folds -0.0 into +0.0 so they tie
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed ints ordered like the floats
    return 0x7FFFFFFF - ordered


def _sorted_by_key(keys: KeyLayout) -> Callable[[Triples], Triples]:
    """Order triples by one sort of their packed keys; returns them in that order."""

    def order(cands: Triples) -> Triples:
        row, orig, val = cands
        packed, perm = torch.sort((row << keys.shift) | (_ordered_desc_bits(val) << keys.col_bits) | orig)
        return packed >> keys.shift, packed & ((1 << keys.col_bits) - 1), val[perm]

    return order


def _sorted_stably(cands: Triples) -> Triples:
    """The same order by three stable sorts: original index, then similarity descending, then row."""
    row, orig, val = cands
    order = torch.argsort(orig, stable=True)
    order = order[torch.argsort(val[order], descending=True, stable=True)]
    order = order[torch.argsort(row[order], stable=True)]
    return row[order], orig[order], val[order]


class TorchScan:
    """The `TileScan` back end in torch: candidates as `(row, original index, similarity)` triples.

    Args:
        layout: the gallery layout, on the compute device.
        chunk: queries per chunk (at most).
        tile: gallery items per tile of step 2.
        settings: the scan's tunables.
        kth_largest: how to take a row's `j`-th largest value (numpy's partition on a CPU).
    """

    def __init__(self, layout: Layout, chunk: int, tile: int, settings: ScanSettings, kth_largest: KthLargest) -> None:
        g = layout.gallery
        self.layout, self.settings, self.kth_largest = layout, settings, kth_largest
        self.size, self.tile = layout.size, tile
        self.first_width = layout.num_sampled or layout.size
        self.tile_buf = torch.empty(chunk, tile, dtype=g.dtype, device=g.device)
        self.first_buf = torch.empty(chunk, self.first_width, dtype=g.dtype, device=g.device)
        keys = KeyLayout.for_gallery(layout.size)
        fits = g.dtype == torch.float32 and keys.fits(chunk)
        self._sorted = _sorted_by_key(keys) if fits else _sorted_stably

    def thresholds(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, j = first_block(self.layout, q, k, own, self.first_buf, self.settings.sample_z)
        # Cosines are >= -1; the floor keeps the -inf self entries out of every candidate set.
        return first, self.kth_largest(first, j).clamp(min=-2.0)

    def similarities(self, q: torch.Tensor, col0: int) -> torch.Tensor:
        return tile_similarities(q, self.layout.gallery, col0, self.tile, self.tile_buf)

    def select(self, sims: torch.Tensor, thresh: torch.Tensor, col0: int, own: torch.Tensor | None = None) -> Triples:
        if own is not None:
            exclude_self(sims, own, col0)
        r, c = (sims >= thresh.unsqueeze(1)).nonzero().unbind(1)
        return r, self.layout.col_to_orig[c + col0], sims[r, c]

    def complete(
        self, parts: list[Triples], k: torch.Tensor, q: torch.Tensor, own: torch.Tensor
    ) -> tuple[Triples, int]:
        """All candidates; rows with fewer than `k_r` are redone against the whole gallery (see `_knn_cpu`)."""
        row, orig, val = (torch.cat(p) for p in zip(*parts, strict=True))
        bad = (torch.bincount(row, minlength=k.shape[0]) < k).nonzero().squeeze(1)
        if not bad.numel():
            return (row, orig, val), 0
        keep = ~torch.isin(row, bad)
        fixed = self._exact(q, k, own, bad)
        kept = (row[keep], orig[keep], val[keep])
        return tuple(torch.cat([c, f]) for c, f in zip(kept, fixed, strict=True)), int(bad.numel())

    def _exact(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor, bad: torch.Tensor) -> Triples:
        """Candidates of rows `bad` at their exact `k_r`-th similarity, against the whole gallery."""
        gallery = self.layout.gallery
        step = max(1, self.settings.fallback_bytes // (4 * gallery.shape[0]))
        parts = []
        for s in range(0, bad.numel(), step):
            rows = bad[s : s + step].to(q.device)
            sims = torch.mm(q[rows], gallery.T)
            exclude_self(sims, own[rows], 0)
            exact = self.kth_largest(sims, k[rows]).clamp(min=-2.0)
            r, orig, val = self.select(sims, exact, 0)
            parts.append((rows[r], orig, val))  # the sub-batch's row numbers become the chunk's
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    def rank(self, cands: Triples, k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, device = k.shape[0], k.device
        row, orig, val = self._sorted(cands)
        counts = torch.bincount(row, minlength=rows)
        pos = torch.arange(row.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row]
        keep = pos < k[row]
        out = torch.full((rows, k_max), -1, dtype=torch.long, device=device)
        out[row[keep], pos[keep]] = orig[keep]
        values = torch.full((rows, k_max), float("-inf"), dtype=val.dtype, device=device)
        values[row[keep], pos[keep]] = val[keep]
        return out, values
