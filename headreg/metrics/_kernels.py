"""Compiled (numba) scan of one similarity tile for the k-NN back ends `_knn_cpu` and `_knn_self`.

One pass over a `(rows, cols)` float32 tile that is still in the core's cache: every entry
at or above its row's threshold becomes a candidate of that row, and, for a tile of a
symmetric (leave-one-out) similarity matrix, every entry at or above its column's
threshold also becomes a candidate of that column. A vectorised pass per row marks the
entries over either threshold; only the 8-entry words with a mark (few: the thresholds keep
about 1.4 K of N entries per row) are looked at again.

A candidate is one int64 key: `(local row << shift) | (desc << col_bits) | original index`,
where `desc` is `0x7FFFFFFF` minus the float's bits mapped to signed integers ordered like
the floats, so that ascending keys are: row, then similarity descending, then original
index ascending. `-0.0` is folded into `+0.0`, so the two tie.

Compiled on first use and cached on disk (`cache=True`); nothing here runs at import.
"""

from __future__ import annotations

import numba
import numpy as np

_NEG_ZERO = np.int32(-(2**31))


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _key(row: int, bits: int, orig: int, shift: int, col_bits: int) -> int:
    if bits == _NEG_ZERO:
        bits = 0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    desc = np.int64(0x7FFFFFFF) - np.int64(ordered)
    return (np.int64(row) << shift) | (desc << col_bits) | orig


@numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"nnan", "reassoc", "nsz"})
def scan_tile(sim, bits, thr_r, thr_c, orig_r, orig_c, shift, col_bits, out_r, out_c):  # noqa: ANN001, ANN201
    """Candidates of one tile; returns `(number written to out_r, number written to out_c)`.

    Args:
        sim: `(rows, cols)` float32 similarities (row-major, any row stride), all finite or -inf.
        bits: the same memory viewed as int32.
        thr_r: `(rows,)` float32 threshold of each row.
        thr_c: `(cols,)` float32 threshold of each column, or empty: rows only.
        orig_r: `(rows,)` int64 original index of each row (the gallery item of a column candidate).
        orig_c: `(cols,)` int64 original index of each column (the gallery item of a row candidate).
        shift, col_bits: the key layout (module docstring).
        out_r: int64 buffer for row candidates, keyed by row (`rows * cols` is always enough).
        out_c: int64 buffer for column candidates, keyed by column.
    """
    rows, cols = sim.shape
    both = thr_c.shape[0] > 0
    # Per row: one vectorised pass marks the entries over either threshold (one byte each), then
    # only the 8-entry words with a mark are looked at again; the tail past the last word is scalar.
    words = cols // 8
    mark = np.zeros(max(words, 1) * 8, dtype=np.uint8)
    mark64 = mark.view(np.uint64)
    lo = np.empty(cols, dtype=np.float32)
    nr = 0
    nc = 0
    for i in range(rows):
        tr = thr_r[i]
        if both:
            for j in range(cols):
                lo[j] = tr if tr < thr_c[j] else thr_c[j]
        else:
            lo[:] = tr
        for j in range(words * 8):
            mark[j] = sim[i, j] >= lo[j]
        for w in range(words + 1):
            j0 = w * 8
            j1 = min(j0 + 8, cols)
            if w < words and mark64[w] == 0:
                continue
            for j in range(j0, j1):
                v = sim[i, j]
                if v >= tr:
                    out_r[nr] = _key(i, bits[i, j], orig_c[j], shift, col_bits)
                    nr += 1
                if both and v >= thr_c[j]:
                    out_c[nc] = _key(j, bits[i, j], orig_r[i], shift, col_bits)
                    nc += 1
    return nr, nc
