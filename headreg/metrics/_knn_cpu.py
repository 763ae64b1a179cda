"""k-NN back end: the compiled CPU tile scan (float32 on a CPU, keys that fit in an int64).

Step 2's compare is one compiled pass per tile while the tile is still in the core's cache
(`_kernels.scan_tile`), which writes step 4's int64 keys (`KeyLayout`) directly. Thresholds,
counts and sorts run in numpy on zero-copy views: its SIMD partition and sort are several times
faster than torch's CPU kernels for these shapes.

`KeyCandidates` (steps 3 and 4 on keys) also serves the leave-one-out scan (`_knn_self`).
Importing this module imports numba; `_knn` does so on first use only.
"""

from __future__ import annotations

import numpy as np
import torch

from headreg.metrics._kernels import scan_tile
from headreg.metrics._knn_base import (
    KeyLayout,
    Layout,
    ScanSettings,
    exclude_self,
    first_block,
    kth_largest_numpy,
    tile_similarities,
)

_NONE_F32 = np.empty(0, dtype=np.float32)
_NONE_I64 = np.empty(0, dtype=np.int64)


def row_keys(a: np.ndarray, thr: np.ndarray, orig_c: np.ndarray, keys: KeyLayout, buf: np.ndarray) -> np.ndarray:
    """Keys of the entries `a[r, c] >= thr[r]` of one `(rows, cols)` float32 block.

    Args:
        a: the block, row-major (any row stride).
        thr: `(rows,)` threshold of each row.
        orig_c: `(cols,)` int64 original index of each column.
        keys: the key layout.
        buf: int64 scratch for the kernel; a block larger than it gets a fresh one.

    Returns:
        The keys, a fresh array.
    """
    out = buf if a.size <= buf.size else np.empty(a.size, dtype=np.int64)
    thr = thr.astype(np.float32, copy=False)
    nr, _ = scan_tile(a, a.view(np.int32), thr, _NONE_F32, _NONE_I64, orig_c, keys.shift, keys.col_bits, out, _NONE_I64)
    return out[:nr].copy()


def row_and_column_keys(
    a: np.ndarray,
    thr_r: np.ndarray,
    thr_c: np.ndarray,
    orig_r: np.ndarray,
    orig_c: np.ndarray,
    keys: KeyLayout,
    bufs: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A block of a symmetric matrix, scanned for its rows (`>= thr_r[r]`) and its columns (`>= thr_c[c]`).

    Column candidates are keyed by column, with the row's original index (`orig_r`). `bufs`
    holds the row and column kernel outputs, each at least `a.size` long.
    """
    out_r, out_c = bufs
    thr_r = thr_r.astype(np.float32, copy=False)
    nr, nc = scan_tile(a, a.view(np.int32), thr_r, thr_c, orig_r, orig_c, keys.shift, keys.col_bits, out_r, out_c)
    return out_r[:nr].copy(), out_c[:nc].copy()


class KeyCandidates:
    """Steps 3 and 4 on packed keys: the count check with its exact fallback, then the ranking."""

    def __init__(self, layout: Layout, settings: ScanSettings, buf: np.ndarray) -> None:
        self.layout, self.settings, self.buf = layout, settings, buf
        self.keys = KeyLayout.for_gallery(layout.size)
        self.c2o = layout.col_to_orig.numpy()

    def complete(
        self, parts: list[np.ndarray], k: torch.Tensor, q: torch.Tensor, own: torch.Tensor
    ) -> tuple[np.ndarray, int]:
        """All keys of the `rows = k.shape[0]` rows; rows with fewer than `k_r` are redone against the gallery.

        A row with at least `k_r` candidates has a proven lower bound of its `k_r`-th value, so
        its candidates hold its exact top `k_r`; the others (rare) get their exact `k_r`-th value.
        """
        shift = self.keys.shift
        keys = np.concatenate(parts)
        counts = np.bincount(keys >> shift, minlength=k.shape[0])
        bad = np.flatnonzero(counts < k.numpy())
        if not bad.size:
            return keys, 0
        is_bad = np.zeros(k.shape[0], dtype=np.bool_)
        is_bad[bad] = True
        kept = keys[~is_bad[keys >> shift]]
        return np.concatenate([kept, self._exact(q, k, own, bad)]), int(bad.size)

    def _exact(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor, bad: np.ndarray) -> np.ndarray:
        """Keys of rows `bad` at their exact `k_r`-th similarity, against the whole gallery."""
        gallery, shift = self.layout.gallery, self.keys.shift
        step = max(1, self.settings.fallback_bytes // (4 * gallery.shape[0]))
        parts = []
        for s in range(0, bad.size, step):
            rows = torch.from_numpy(bad[s : s + step])
            sims = torch.mm(q[rows], gallery.T)
            exclude_self(sims, own[rows], 0)
            exact = kth_largest_numpy(sims, k[rows]).clamp(min=-2.0)
            part = row_keys(sims.numpy(), exact.numpy(), self.c2o, self.keys, self.buf)
            # The sub-batch's row numbers become the chunk's.
            parts.append((part & ((1 << shift) - 1)) | (rows.numpy()[part >> shift] << shift))
        return np.concatenate(parts)

    def rank(self, keys: np.ndarray, k: torch.Tensor, k_max: int) -> torch.Tensor:
        """`(rows, k_max)` original indices of each row's best `k_r` keys, padded with -1."""
        best, valid = self._best(keys, k, k_max)
        return torch.from_numpy(np.where(valid, best & ((1 << self.keys.col_bits) - 1), -1))

    def rank_values(self, keys: np.ndarray, k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`rank`, and the float32 similarity of each entry (`-inf` in the padding), decoded from its key."""
        best, valid = self._best(keys, k, k_max)
        idx = np.where(valid, best & ((1 << self.keys.col_bits) - 1), -1)
        # The inverse of `_kernels._key`'s map (-0.0 came in folded into +0.0).
        ordered = (0x7FFFFFFF - ((best >> self.keys.col_bits) & 0xFFFFFFFF)).astype(np.int32)
        values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)
        return torch.from_numpy(idx), torch.from_numpy(np.where(valid, values, np.float32(-np.inf)))

    def _best(self, keys: np.ndarray, k: torch.Tensor, k_max: int) -> tuple[np.ndarray, np.ndarray]:
        """`(rows, k_max)` keys of each row's best `k_r`, and which of them are real (the rest repeat one)."""
        keys.sort()  # numpy's SIMD sort: row, then similarity descending, then original index
        counts = np.bincount(keys >> self.keys.shift, minlength=k.shape[0])
        # Row r's candidates are keys[start_r : start_r + counts_r], best first; take k_r of them.
        idx = (np.cumsum(counts) - counts)[:, None] + np.arange(k_max)
        valid = np.arange(k_max) < k.numpy()[:, None]
        return keys[np.minimum(idx, keys.size - 1)], valid


class CpuTileScan:
    """The `TileScan` back end on a CPU: float32 tiles of `tile` gallery items, scanned by `_kernels`."""

    def __init__(self, layout: Layout, chunk: int, tile: int, settings: ScanSettings) -> None:
        self.layout, self.settings = layout, settings
        self.size, self.tile = layout.size, tile
        self.first_width = layout.num_sampled or layout.size
        self.tile_buf = torch.empty(chunk, tile, dtype=torch.float32)
        self.first_buf = torch.empty(chunk, self.first_width, dtype=torch.float32)
        self.scratch = torch.empty_like(self.first_buf)  # the partition's copy of the first block
        self.cands = KeyCandidates(layout, settings, np.empty(chunk * tile, dtype=np.int64))

    def thresholds(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, j = first_block(self.layout, q, k, own, self.first_buf, self.settings.sample_z)
        # Cosines are >= -1; the floor keeps the -inf self entries out of every candidate set.
        return first, kth_largest_numpy(first, j, self.scratch[: q.shape[0]]).clamp(min=-2.0)

    def similarities(self, q: torch.Tensor, col0: int) -> torch.Tensor:
        return tile_similarities(q, self.layout.gallery, col0, self.tile, self.tile_buf)

    def select(
        self, sims: torch.Tensor, thresh: torch.Tensor, col0: int, own: torch.Tensor | None = None
    ) -> np.ndarray:
        a = sims.numpy()
        if own is not None:  # exclude_self in numpy: torch's per-call cost would dominate on a tile
            rel = own.numpy() - col0
            hit = np.flatnonzero((rel >= 0) & (rel < a.shape[1]))
            if hit.size:
                a[hit, rel[hit]] = -np.inf
        c2o = self.cands.c2o[col0 : col0 + a.shape[1]]
        return row_keys(a, thresh.numpy(), c2o, self.cands.keys, self.cands.buf)

    def complete(
        self, parts: list[np.ndarray], k: torch.Tensor, q: torch.Tensor, own: torch.Tensor
    ) -> tuple[np.ndarray, int]:
        return self.cands.complete(parts, k, q, own)

    def rank(self, cands: np.ndarray, k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cands.rank_values(cands, k, k_max)
