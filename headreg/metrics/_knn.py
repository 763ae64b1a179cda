"""Exact, chunked k-nearest-neighbour search by cosine similarity, with a per-query k.

The retrieval metrics need, for each query `q`, its `K_q` nearest gallery items in
exact order, where `K_q = max(R_q, k_small)` varies from query to query (`R_q`, the
number of positives, reaches ~1,000 at N = 100,000 with 100 classes). A `torch.topk`
with k = max K over whole rows costs about twice the similarity matmul itself on a
CPU, so this module never ranks whole rows; it keeps only the entries above a
per-query threshold, and on a CPU it does so while each piece of the similarity
matrix is still in the core's cache:

0. Layout (once): the gallery is shuffled (seeded) and stably sorted by
   `gallery_groups` (the labels, when the caller has them); every `_SAMPLE_STRIDE`-th
   item of that order, a sample spread evenly over the groups, is moved to the front
   (`m` items). The layout only changes speed, never the result.
1. Per chunk of queries, the sample's similarities `G[:m] @ Q_c^T` give each query a
   threshold `t_q`: the `j_q`-th largest of them, with `j_q = ceil(e + z·sqrt(e)) + 1`
   and `e = K_q·m/N` the expected count, so that usually `count(S_q ≥ t_q) ≥ K_q`.
   Below `_MIN_SAMPLED_GALLERY` items `t_q` is the exact `K_q`-th value instead.
2. The rest of the gallery goes by in tiles of `tile` items: each tile's similarities
   `G_t @ Q_c^T` (`tile × chunk` floats, 2 MiB by default on a CPU: the whole
   `N × chunk` block never goes out to memory) are compared with `t` and only the
   entries `≥ t_q` are kept, with their row and column. The candidates are exactly
   `{S_q ≥ t_q}`.
3. Every row's count is checked: where it is at least `K_q`, `t_q` is a proven lower
   bound of the `K_q`-th largest similarity, so the candidates contain the exact top
   `K_q`. Rows that fail (rare, or forced in tests) are recomputed against the whole
   gallery with their exact `K_q`-th value.
4. Only the candidates (~1.4 K_q per row) are sorted, with one int64 key each (row,
   then similarity descending, then original gallery index ascending), in one sort
   per chunk.

On a CPU the compare of step 2 is one compiled pass per tile while the tile is still
in cache (`_kernels.scan_tile`, numba), which writes the keys of step 4 directly;
thresholds, counts and sorts run in numpy on zero-copy views (its SIMD partition and
sort are several times faster than torch's CPU kernels for these shapes). Other
devices run the same steps in torch, with the whole gallery as one tile.

Leave-one-out (`iter_self_neighbours`): the similarity matrix is symmetric, so on a
CPU each tile above the diagonal is computed once and scanned for its rows and for
its columns, against each side's threshold: about half the matrix products.

Ties: two gallery items with bit-identical similarity are ranked by their original
gallery index, lower first, whatever the device, chunking or layout. A query is never
its own neighbour (`self_index`), even when a duplicate has the same similarity.

Memory: O(chunk × tile) for the similarity tile, O(chunk × N/_SAMPLE_STRIDE) for the
sample, and the candidates (~1.4 chunk × K); neighbours are yielded chunk by chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from headreg.errors import InvalidValueError

__all__ = ["iter_ranked_neighbours", "iter_self_neighbours", "plan_chunks", "self_scan_applies", "similarity_tiles"]

# z-score of the sampled threshold: larger means fewer fallbacks but more candidates to sort.
_SAMPLE_Z = 3.0
# One gallery item in this many forms the threshold sample.
_SAMPLE_STRIDE = 16
# Below this many gallery items the threshold is the exact `K_q`-th value (no sampling).
_MIN_SAMPLED_GALLERY = 4096
# CPU: queries per chunk and gallery items per tile (a 1024 x 512 float32 tile is 2 MiB,
# about one core's L2 cache; the matmul is also fastest at this shape, see docs/benchmarks.md).
_CPU_CHUNK = 512
_CPU_TILE = 1024
# Other devices: bytes of similarity buffer per chunk (the whole gallery is one tile).
_DEVICE_CHUNK_BYTES = 256 * 2**20
# Bytes of full similarity rows the fallback may hold at once.
_FALLBACK_BYTES = 32 * 2**20
# The symmetric scan's keys hold the original index in this many bits at most (N < 2^22).
_SELF_MAX_COL_BITS = 22
_NONE_F32 = np.empty(0, dtype=np.float32)
_NONE_I64 = np.empty(0, dtype=np.int64)


def plan_chunks(num_gallery: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """`(queries per chunk, gallery items per tile)` used when the caller gives no chunk size."""
    if torch.device(device).type == "cpu":
        return _CPU_CHUNK, _CPU_TILE
    rows = int(max(8, min(4096, _DEVICE_CHUNK_BYTES // (4 * max(num_gallery, 1)))))
    return rows, max(num_gallery, 1)


def similarity_tiles(
    query: torch.Tensor, gallery: torch.Tensor, tile: int, out: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(g0, Q @ G[g0:g0+tile]^T)`: one `(Q, tile)` similarity tile at a time.

    `out`, if given, is a `(Q, tile)` buffer reused for every full tile. This is all the
    matmul work of `iter_ranked_neighbours` (the benchmarks time it alone as the floor).
    """
    for g0 in range(0, gallery.shape[0], tile):
        g1 = min(g0 + tile, gallery.shape[0])
        if out is not None and out.shape == (query.shape[0], g1 - g0):
            yield g0, torch.mm(query, gallery[g0:g1].T, out=out)
        else:
            yield g0, torch.mm(query, gallery[g0:g1].T)


def _ordered_desc_bits(values: torch.Tensor) -> torch.Tensor:
    """Map float32 similarities to int64 in [0, 2^32) whose ascending order is descending similarity."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 folds -0.0 into +0.0 so they tie
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed ints ordered like the floats
    return 0x7FFFFFFF - ordered


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iter_ranked_neighbours(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k_per_query: torch.Tensor,
    self_index: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    tile_size: int | None = None,
    backend: str = "torch",
    seed: int = 0,
    stats: dict[str, float] | None = None,
    gallery_groups: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield the exact `K_q` nearest gallery items of each query, chunk by chunk.

    Args:
        query: `(Q, D)` L2-normalised float query embeddings, on the compute device.
        gallery: `(N_g, D)` L2-normalised float gallery embeddings, same device and dtype.
        k_per_query: `(Q,)` int64, neighbours wanted per query; clamped to the number of
            gallery items the query may match (`N_g`, or `N_g - 1` when it has a self index).
        self_index: `(Q,)` int64 index of each query inside the gallery, `-1` for none;
            that item is never returned. `None`: no query is in the gallery.
        chunk_size: queries per chunk; `None` picks one (`plan_chunks`).
        tile_size: gallery items per similarity tile; `None` picks one (`plan_chunks`).
        backend: `"torch"` (exact, described in the module docstring) or `"faiss"`
            (faiss `IndexFlatIP`, CPU; ties in faiss's own order).
        seed: seeds the gallery shuffle behind the threshold sample (results do not depend on it).
        stats: if given, receives seconds spent per stage and the number of fallback rows.
        gallery_groups: `(N_g,)` optional group (label) of each gallery item; spreads the
            threshold sample evenly over the groups. Speed only.

    Yields:
        `(start, neighbours)`: `neighbours` is `(c, L)` int64 gallery indices for queries
        `start:start+c`, best first, padded with `-1`; row `r` holds exactly
        `min(K_r, available_r)` valid entries.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    device = query.device
    has_self = torch.zeros(num_query, dtype=torch.bool, device=device)
    if self_index is not None:
        self_index = self_index.to(device)
        has_self = self_index >= 0
    available = num_gallery - has_self.long()
    k_all = torch.minimum(k_per_query.to(device).clamp(min=1), available).clamp(min=0)
    auto_chunk, auto_tile = plan_chunks(num_gallery, device)
    chunk_size = chunk_size or auto_chunk
    tile_size = tile_size or auto_tile
    if backend == "faiss":
        yield from _iter_faiss(query, gallery, k_all, self_index, chunk_size)
        return
    if backend != "torch":
        raise InvalidValueError(f"knn_backend must be 'torch' or 'faiss', got {backend!r}")

    layout = _Layout(gallery, gallery_groups, seed, sampled=num_gallery >= _MIN_SAMPLED_GALLERY)
    scan = _Scan(layout, chunk_size, tile_size, _stage_times(stats))
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        rows = stop - start
        k = k_all[start:stop]
        k_max = int(k.max()) if rows else 0
        if k_max == 0:
            yield start, torch.full((rows, 0), -1, dtype=torch.long, device=device)
            continue
        # Column of each query's own entry in the layout, -1 for none.
        own = torch.full((rows,), -1, dtype=torch.long, device=device)
        if self_index is not None:
            s = self_index[start:stop]
            own = torch.where(s >= 0, layout.orig_to_col[s.clamp(min=0)], own)
        yield start, scan.chunk(query[start:stop], k, k_max, own)


class _Layout:
    """The gallery shuffled, grouped, with a threshold sample spread over the groups in front.

    Items are shuffled (seeded), stably sorted by group, and every `_SAMPLE_STRIDE`-th
    item of that order is moved to the front (`num_sampled` items, none when not
    `sampled`). `col_to_orig[c]` is the original index of column `c`, `orig_to_col` its inverse.
    """

    def __init__(self, gallery: torch.Tensor, groups: torch.Tensor | None, seed: int, sampled: bool) -> None:
        n, device = gallery.shape[0], gallery.device
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=gen)
        if groups is not None:
            order = order[torch.argsort(groups.cpu()[order], stable=True)]
        self.num_sampled = 0
        if sampled:
            in_sample = torch.zeros(n, dtype=torch.bool)
            in_sample[::_SAMPLE_STRIDE] = True
            order = torch.cat([order[in_sample], order[~in_sample]])
            self.num_sampled = int(in_sample.sum())
        self.size = n
        self.col_to_orig = order.to(device)
        self.orig_to_col = torch.empty(n, dtype=torch.long, device=device)
        self.orig_to_col[self.col_to_orig] = torch.arange(n, device=device)
        self.gallery = gallery[self.col_to_orig].contiguous()


class _Scan:
    """Steps 1–4 of the module docstring for one chunk of queries at a time."""

    def __init__(self, layout: _Layout, chunk: int, tile: int, timing: dict[str, float] | None) -> None:
        self.layout, self.tile, self.timing = layout, tile, timing
        g = layout.gallery
        self.col_bits = max(1, (layout.size - 1).bit_length())
        self.shift = 32 + self.col_bits
        # One int64 key per candidate (row, similarity descending, original index) when it fits.
        self.packed = g.dtype == torch.float32 and max(1, (chunk - 1).bit_length()) + self.shift <= 63
        self.fast = self.packed and _numpy_ok(g)
        self.tile_buf = torch.empty(chunk, tile, dtype=g.dtype, device=g.device)
        # The first block (the sample, or a small gallery) and a scratch copy for the partition:
        # allocated by the first `chunk` (the leave-one-out scan has its own per thread).
        self.first_buf: torch.Tensor | None = None
        self.scratch: torch.Tensor | None = None
        if self.fast:
            self.out_buf = np.empty(chunk * tile, dtype=np.int64)  # a larger block gets a fresh one
            self.out_c_buf = np.empty(chunk * chunk, dtype=np.int64)  # square tiles of the leave-one-out scan
            self.c2o = layout.col_to_orig.numpy()

    def _tick(self) -> float:
        if self.timing is None:
            return 0.0
        _sync(self.layout.gallery.device)
        return time.perf_counter()

    def chunk(self, q: torch.Tensor, k: torch.Tensor, k_max: int, own: torch.Tensor) -> torch.Tensor:
        """`(rows, k_max)` original gallery indices of each query's `k_r` nearest, padded with -1."""
        layout, rows = self.layout, q.shape[0]
        n, m = layout.size, layout.num_sampled
        t0 = self._tick()
        if self.first_buf is None:
            g = layout.gallery
            self.first_buf = torch.empty(self.tile_buf.shape[0], m or n, dtype=g.dtype, device=g.device)
            self.scratch = torch.empty_like(self.first_buf) if self.fast else None
        # The sample (or, for a small gallery, everything): its similarities give the thresholds
        # and are also the candidates' source for their own columns.
        first = torch.mm(q, layout.gallery[: m or n].T, out=self.first_buf[:rows])
        _exclude_self(first, own, 0)
        scratch = None if self.scratch is None else self.scratch[:rows]
        if m:
            thresh = _kth_largest(first, _sample_rank(k, m, n), scratch)
        else:
            thresh = _kth_largest(first, k, scratch)
        # Cosines are >= -1; this keeps the -inf self entries out of every candidate set.
        thresh = thresh.clamp(min=-2.0)
        t1 = self._tick()
        parts = [self._select(first, thresh, 0)]
        t_mm = t_sel = 0.0
        t2 = self._tick()
        buf = self.tile_buf if rows == self.tile_buf.shape[0] else None
        for g0, sims in similarity_tiles(q, layout.gallery[m or n :], self.tile, buf):
            t3 = self._tick()
            self._exclude(sims, own, g0 + (m or n))
            parts.append(self._select(sims, thresh, g0 + (m or n)))
            t4 = self._tick()
            t_mm, t_sel, t2 = t_mm + t3 - t2, t_sel + t4 - t3, t4
        cands = self._merge(parts, k, own, q, rows)
        t5 = self._tick()
        out = self._rank(cands, k, rows, k_max)
        if self.timing is not None:
            t6 = self._tick()
            self.timing["threshold"] += t1 - t0
            self.timing["matmul"] += t_mm
            self.timing["select"] += t_sel + (t2 - t1) + (t5 - t2 - t_mm - t_sel)
            self.timing["sort"] += t6 - t5
        return out

    def _exclude(self, sims: torch.Tensor, own: torch.Tensor, col0: int) -> None:
        """`_exclude_self` on one tile; in numpy on the CPU path, where torch's per-call cost would dominate."""
        if not self.fast:
            _exclude_self(sims, own, col0)
            return
        rel = own.numpy() - col0
        hit = np.flatnonzero((rel >= 0) & (rel < sims.shape[1]))
        if hit.size:
            sims.numpy()[hit, rel[hit]] = -np.inf

    def _select(self, sims: torch.Tensor, thresh: torch.Tensor, col0: int) -> object:
        """Candidates `sims[r, c] >= thresh[r]` of one `(rows, width)` block: packed keys or `(row, col, val)`."""
        if not self.fast:
            r, c = (sims >= thresh.unsqueeze(1)).nonzero().unbind(1)
            val, orig = sims[r, c], self.layout.col_to_orig[c + col0]
            if self.packed:
                return (r << self.shift) | (_ordered_desc_bits(val) << self.col_bits) | orig
            return r, orig, val
        return self._kernel_scan(sims.numpy(), thresh.numpy(), self.c2o[col0 : col0 + sims.shape[1]])

    def _kernel_scan(
        self,
        a: np.ndarray,
        thr_r: np.ndarray,
        orig_c: np.ndarray,
        thr_c: np.ndarray = _NONE_F32,
        orig_r: np.ndarray = _NONE_I64,
        bufs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """`_kernels.scan_tile` on one float32 block: the row keys, and with `thr_c` also the column keys.

        `bufs`: the `(row, column)` key buffers to write into (another thread's); default this scan's.
        """
        from headreg.metrics._kernels import scan_tile  # noqa: PLC0415 - compiled on first use

        buf_r, buf_c = bufs or (self.out_buf, self.out_c_buf)
        size = a.shape[0] * a.shape[1]
        out_r = buf_r if size <= buf_r.size else np.empty(size, dtype=np.int64)
        out_c = buf_c if thr_c.size else _NONE_I64
        thr_r = thr_r.astype(np.float32, copy=False)
        nr, nc = scan_tile(a, a.view(np.int32), thr_r, thr_c, orig_r, orig_c, self.shift, self.col_bits, out_r, out_c)
        rows_part = out_r[:nr].copy()
        return (rows_part, out_c[:nc].copy()) if thr_c.size else rows_part

    def _merge(self, parts: list, k: torch.Tensor, own: torch.Tensor, q: torch.Tensor, rows: int) -> object:
        """All candidates of the chunk; rows with fewer than `k_r` are redone against the whole gallery."""
        if self.fast:
            keys = np.concatenate(parts)
            counts = np.bincount(keys >> self.shift, minlength=rows)
            bad = np.flatnonzero(counts < k.numpy())
            if not bad.size:
                return keys
            is_bad = np.zeros(rows, dtype=np.bool_)
            is_bad[bad] = True
            kept = keys[~is_bad[keys >> self.shift]]
            fixed = self._exact(q, k, own, torch.from_numpy(bad))
            return np.concatenate([kept, fixed])
        cands = [torch.cat(p) for p in zip(*parts, strict=True)] if not self.packed else [torch.cat(parts)]
        row = cands[0] >> self.shift if self.packed else cands[0]
        bad = (torch.bincount(row, minlength=rows) < k).nonzero().squeeze(1)
        if not bad.numel():
            return cands
        keep = ~torch.isin(row, bad)
        fixed = self._exact(q, k, own, bad)
        return [torch.cat([c[keep], f]) for c, f in zip(cands, fixed, strict=True)]

    def _exact(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor, bad: torch.Tensor) -> object:
        """Candidates of rows `bad` at their exact `k_r`-th similarity, against the whole gallery."""
        if self.timing is not None:
            self.timing["fallback_rows"] += float(bad.numel())
        gallery = self.layout.gallery
        step = max(1, _FALLBACK_BYTES // (4 * gallery.shape[0]))
        parts = []
        for s in range(0, bad.numel(), step):
            rows = bad[s : s + step].to(q.device)
            sims = torch.mm(q[rows], gallery.T)
            _exclude_self(sims, own[rows], 0)
            exact = _kth_largest(sims, k[rows]).clamp(min=-2.0)
            part = self._select(sims, exact, 0)
            # Renumber the sub-batch's rows as the chunk's rows.
            if self.packed:
                chunk_rows = rows.numpy() if self.fast else rows
                part = (part & ((1 << self.shift) - 1)) | (chunk_rows[part >> self.shift] << self.shift)
            else:
                part = (rows[part[0]], part[1], part[2])
            parts.append(part)
        if self.fast:
            return np.concatenate(parts)
        if self.packed:
            return [torch.cat(parts)]
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    def _rank(self, cands: object, k: torch.Tensor, rows: int, k_max: int) -> torch.Tensor:
        """`(rows, k_max)` original indices of the best `k_r` candidates of each row, padded with -1."""
        col_mask = (1 << self.col_bits) - 1
        if self.fast:
            keys = cands
            keys.sort()  # numpy's SIMD sort: row, then similarity descending, then original index
            counts = np.bincount(keys >> self.shift, minlength=rows)
            # Row r's candidates are keys[start_r : start_r + counts_r], best first; take k_r of them.
            idx = (np.cumsum(counts) - counts)[:, None] + np.arange(k_max)
            valid = np.arange(k_max) < k.numpy()[:, None]
            out = np.where(valid, keys[np.minimum(idx, keys.size - 1)] & col_mask, -1)
            return torch.from_numpy(out)
        device = k.device
        if self.packed:
            keys = torch.sort(cands[0]).values
            row, orig = keys >> self.shift, keys & col_mask
        else:
            row, orig, val = cands
            order = torch.argsort(orig, stable=True)
            order = order[torch.argsort(val[order], descending=True, stable=True)]
            order = order[torch.argsort(row[order], stable=True)]
            row, orig = row[order], orig[order]
        counts = torch.bincount(row, minlength=rows)
        pos = torch.arange(row.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row]
        keep = pos < k[row]
        out = torch.full((rows, k_max), -1, dtype=torch.long, device=device)
        out[row[keep], pos[keep]] = orig[keep]
        return out


_STAGES = ("matmul", "threshold", "select", "sort", "fallback_rows")


def _stage_times(stats: dict[str, float] | None) -> dict[str, float] | None:
    """`stats` with every stage key present (seconds, and the count of fallback rows); None stays None."""
    if stats is not None:
        for key in _STAGES:
            stats.setdefault(key, 0.0)
    return stats


def _sample_rank(k: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """`j_q` of step 1: the rank in the `m`-item sample whose value is, usually, below the `K_q`-th of `n`."""
    e = k.double() * (m / n)
    return ((e + _SAMPLE_Z * e.sqrt()).ceil().long() + 1).clamp(min=1, max=m)


def self_scan_applies(x: torch.Tensor, block: int = _CPU_CHUNK) -> bool:
    """Whether `iter_self_neighbours` runs its symmetric scan for these embeddings (else it delegates)."""
    n = x.shape[0]
    key_bits = max(1, (block - 1).bit_length()) + 32 + max(1, (n - 1).bit_length())
    return _numpy_ok(x) and x.dtype == torch.float32 and n >= _MIN_SAMPLED_GALLERY and key_bits <= 63


def iter_self_neighbours(
    x: torch.Tensor,
    k_per_item: torch.Tensor,
    *,
    chunk_size: int | None = None,
    seed: int = 0,
    stats: dict[str, float] | None = None,
    groups: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Leave-one-out: the exact `K_i` nearest other items of every item `i` with `K_i > 0`.

    The same neighbours as `iter_ranked_neighbours(x, x, k, arange(N))`, but the similarity
    matrix is symmetric, so on a CPU each tile above the diagonal is computed once and
    serves both its rows and its columns (about half the matrix products):

    1. Strip: every block of rows against the threshold sample (the first `m` items of
       the layout) gives all thresholds, the candidates of every row among the sample's
       columns, and, read by column, the candidates of the sample's rows among the other
       items. The sample's rows are then complete.
    2. Square: for the other items, blocks `(I, J)` with `J >= I` are scanned by row (for
       block `I`) and by column (for block `J`); block `I` is complete after its row of
       tiles. With the gallery grouped by label, a block's candidates come from blocks
       nearby, so few wait in memory.

    Elsewhere (GPU, float64, a small or huge `N`) it runs `iter_ranked_neighbours`.

    Args:
        x: `(N, D)` L2-normalised embeddings.
        k_per_item: `(N,)` int64 neighbours wanted per item; `0`: the item is not a query.
        chunk_size: items per block (`None`: 512 on a CPU).
        seed, stats, groups: as `iter_ranked_neighbours` (`groups` = `gallery_groups`).

    Yields:
        `(items, neighbours)`: `items` are the `(c,)` original indices of items with
        `K_i > 0`, `neighbours` `(c, L)` their neighbours, best first, padded with `-1`.
    """
    n = x.shape[0]
    k_all = k_per_item.to(x.device).clamp(min=0, max=n - 1)
    block = chunk_size or _CPU_CHUNK
    if not self_scan_applies(x, block):
        queries = (k_all > 0).nonzero().squeeze(1)
        chunks = iter_ranked_neighbours(
            x[queries], x, k_all[queries], queries, chunk_size=chunk_size, seed=seed, stats=stats, gallery_groups=groups
        )
        for start, nbr in chunks:
            yield queries[start : start + nbr.shape[0]], nbr
        return
    yield from _SelfScan(x, k_all, groups, seed, stats, block).run()


# A unit of the symmetric scan's work: candidate keys per destination block, and seconds per stage.
_Work = tuple[list[tuple[int, np.ndarray]], dict[str, float]]


class _SelfScan:
    """The two passes of `iter_self_neighbours` (CPU, float32), with `_Scan`'s keys, fallback and ranking.

    With more than one torch thread the tiles go to as many worker threads, one torch thread
    each (the matmul and the compiled scan release the GIL); this thread files their
    candidates, ranks finished blocks and hands them on. Stage times are then thread-seconds.
    """

    def __init__(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        groups: torch.Tensor | None,
        seed: int,
        stats: dict[str, float] | None,
        block: int,
    ) -> None:
        self.layout = layout = _Layout(x, groups, seed, sampled=True)
        self.timing = _stage_times(stats) if stats is not None else dict.fromkeys(_STAGES, 0.0)
        self.block = b = block
        self.scan = _Scan(layout, b, b, stats)
        self.local = threading.local()
        n, m = layout.size, layout.num_sampled
        self.k = k.cpu()[layout.col_to_orig]  # in layout order
        # Blocks of rows (and columns): the sample's, then the others', each aligned to its start.
        self.starts = [*range(0, m, b), *range(m, n, b)]
        self.ends = [min(s + b, m if s < m else n) for s in self.starts]
        self.pending: dict[int, list[np.ndarray]] = {i: [] for i in range(len(self.starts))}
        self.thr = np.full(n, np.inf, dtype=np.float32)

    def run(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        m = self.layout.num_sampled
        sample = [i for i, s in enumerate(self.starts) if s < m]
        others = [i for i, s in enumerate(self.starts) if s >= m]
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) if threads > 1 else None
        try:
            # The sample's thresholds first: the other strips read them for their column candidates.
            self._collect([self._submit(pool, self._strip, i, sample) for i in sample])
            self._collect([self._submit(pool, self._strip, i, sample) for i in others])
            for i in sample:
                yield from self._finish(i)
            # Row of tiles by row of tiles; the next row's tiles are computed while a finished
            # block is ranked and handed on.
            rows = [[self._submit(pool, self._tile, bi, bj) for bj in others[a:]] for a, bi in enumerate(others[:1])]
            for a, bi in enumerate(others):
                if a + 1 < len(others):
                    rows.append([self._submit(pool, self._tile, others[a + 1], bj) for bj in others[a + 1 :]])
                self._collect(rows.pop(0))
                yield from self._finish(bi)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    @staticmethod
    def _submit(pool: ThreadPoolExecutor | None, fn: Callable[..., _Work], *args: object) -> Future[_Work]:
        """`fn(*args)` on the pool, or now on this thread (one torch thread: no pool)."""
        if pool is not None:
            return pool.submit(fn, *args)
        done: Future[_Work] = Future()
        done.set_result(fn(*args))
        return done

    def _collect(self, futures: list[Future[_Work]]) -> None:
        """File each work item's candidates under their blocks and add up its stage times."""
        for fut in futures:
            parts, times = fut.result()
            for block, keys in parts:
                self.pending[block].append(keys)
            for key, sec in times.items():
                self.timing[key] += sec

    def _buffers(self) -> SimpleNamespace:
        """This thread's buffers: a tile, the sample strip and its partition scratch, the key outputs."""
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            b, m = self.block, self.layout.num_sampled
            bufs = self.local.bufs = SimpleNamespace(
                tile=torch.empty(b, b),
                strip=torch.empty(b, m),
                scratch=torch.empty(b, m),
                keys=(np.empty(b * b, dtype=np.int64), np.empty(b * b, dtype=np.int64)),
            )
        return bufs

    def _strip(self, i: int, sample: list[int]) -> _Work:
        """Pass 1 for block `i`: its similarities to the sample, thresholds, and candidates both ways."""
        layout, bufs = self.layout, self._buffers()
        n, m = layout.size, layout.num_sampled
        r0, r1 = self.starts[i], self.ends[i]
        t0 = time.perf_counter()
        sims = torch.mm(layout.gallery[r0:r1], layout.gallery[:m].T, out=bufs.strip[: r1 - r0])
        if r0 < m:
            _exclude_self(sims, torch.arange(r0, r1), 0)
        k = self.k[r0:r1]
        thr = _kth_largest(sims, _sample_rank(k.clamp(min=1), m, n), bufs.scratch[: r1 - r0])
        self.thr[r0:r1] = np.where(k.numpy() > 0, thr.clamp(min=-2.0).numpy(), np.inf)
        t1 = time.perf_counter()
        a, parts = sims.numpy(), []
        for j in sample:  # column blocks of the sample: a column's candidates go to its block
            c0, c1 = self.starts[j], self.ends[j]
            parts += self._scan(a[:, c0:c1], i, r0, c0, j if r0 >= m else None)
        return parts, {"threshold": t1 - t0, "select": time.perf_counter() - t1}

    def _tile(self, bi: int, bj: int) -> _Work:
        """Pass 2: tile `(bi, bj)` of the square, `bj >= bi`, scanned by row and (above the diagonal) by column."""
        g, bufs = self.layout.gallery, self._buffers()
        r0, r1, c0, c1 = self.starts[bi], self.ends[bi], self.starts[bj], self.ends[bj]
        t0 = time.perf_counter()
        out = bufs.tile if (r1 - r0, c1 - c0) == tuple(bufs.tile.shape) else None
        sims = torch.mm(g[r0:r1], g[c0:c1].T, out=out).numpy()
        t1 = time.perf_counter()
        if bi == bj:
            np.fill_diagonal(sims, -np.inf)  # never its own neighbour
        parts = self._scan(sims, bi, r0, c0, None if bi == bj else bj)
        return parts, {"matmul": t1 - t0, "select": time.perf_counter() - t1}

    def _scan(self, a: np.ndarray, bi: int, r0: int, c0: int, bj: int | None = None) -> list[tuple[int, np.ndarray]]:
        """Candidates of tile rows `r0:` (for block `bi`), and with `bj` of its columns `c0:` (for block `bj`)."""
        rows, cols = a.shape
        c2o, keys = self.scan.c2o, self._buffers().keys
        if bj is None:
            return [(bi, self.scan._kernel_scan(a, self.thr[r0 : r0 + rows], c2o[c0 : c0 + cols], bufs=keys))]
        by_row, by_col = self.scan._kernel_scan(
            a, self.thr[r0 : r0 + rows], c2o[c0 : c0 + cols], self.thr[c0 : c0 + cols], c2o[r0 : r0 + rows], keys
        )
        return [(bi, by_row), (bj, by_col)]

    def _finish(self, i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Block `i` is complete: check counts (fallback), rank, and yield its querying items."""
        r0, r1 = self.starts[i], self.ends[i]
        k = self.k[r0:r1]
        parts = self.pending.pop(i) or [_NONE_I64]
        k_max = int(k.max())
        if k_max == 0:
            return
        t0 = time.perf_counter()
        own = torch.arange(r0, r1)
        cands = self.scan._merge(parts, k, own, self.layout.gallery[r0:r1], r1 - r0)
        t1 = time.perf_counter()
        nbr = self.scan._rank(cands, k, r1 - r0, k_max)
        self.timing["select"] += t1 - t0
        self.timing["sort"] += time.perf_counter() - t1
        keep = (k > 0).nonzero().squeeze(1)
        yield self.layout.col_to_orig[r0:r1][keep], nbr[keep]


def _exclude_self(sims: torch.Tensor, own: torch.Tensor, col0: int) -> None:
    """Set `sims[r, own[r] - col0]` to -inf where that column is inside `sims` (`(rows, width)`)."""
    rel = own - col0
    hit = (rel >= 0) & (rel < sims.shape[1])
    if bool(hit.any()):
        r = hit.nonzero().squeeze(1)
        sims[r, rel[r]] = float("-inf")


def _numpy_ok(t: torch.Tensor) -> bool:
    """Whether the CPU fast path (numpy: SIMD sort, partition and compare) applies."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad


def _kth_largest(sim: torch.Tensor, j: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The exact `j_r`-th largest value of each row `r` of `sim` (`1 <= j_r <= width`), `(rows,)`.

    On a CPU, numpy's partition (SIMD) is several times faster than `torch.topk`; it works
    in `scratch` (same shape as `sim`) when given, which saves a fresh allocation per call.
    """
    j_max = int(j.max())
    if not _numpy_ok(sim):
        top = torch.topk(sim, j_max, dim=1, sorted=True).values
        return top.gather(1, (j - 1).unsqueeze(1)).squeeze(1)
    width = sim.shape[1]
    if scratch is None:
        a = np.partition(sim.numpy(), width - j_max, axis=1)
    else:
        a = scratch.numpy()
        np.copyto(a, sim.numpy())
        a.partition(width - j_max, axis=1)
    top = a[:, width - j_max :]  # the j_max largest, unordered
    top.sort(axis=1)
    return torch.from_numpy(top[np.arange(a.shape[0]), j_max - j.numpy()])


def _iter_faiss(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k_all: torch.Tensor,
    self_index: torch.Tensor | None,
    chunk_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The same contract through faiss `IndexFlatIP` (inner product = cosine here)."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise InvalidValueError(
            "knn_backend='faiss' needs the faiss package; install it with `pip install faiss-cpu` "
            "(or `pip install headreg[faiss]`), or use knn_backend='torch'"
        ) from exc
    device = query.device
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery.detach().float().cpu().contiguous().numpy())
    # faiss returns a fixed k per call: search k_max (+1 for the query itself) per chunk.
    chunk_size = max(chunk_size, 256)
    for start in range(0, query.shape[0], chunk_size):
        stop = min(start + chunk_size, query.shape[0])
        k = k_all[start:stop].cpu()
        k_max = int(k.max())
        extra = 1 if self_index is not None else 0
        search_k = min(k_max + extra, gallery.shape[0])
        _, idx = index.search(query[start:stop].detach().float().cpu().contiguous().numpy(), search_k)
        idx = torch.from_numpy(idx).long()
        if self_index is not None:
            own = self_index[start:stop].cpu()
            idx = torch.where(idx == own.unsqueeze(1), torch.full_like(idx, -1), idx)
        # Compact each row: drop the self entry, keep the first k_r valid ones.
        valid = idx >= 0
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        idx = idx.gather(1, order)
        pos = torch.arange(idx.shape[1]).unsqueeze(0)
        idx = torch.where(pos < k.unsqueeze(1), idx, torch.full_like(idx, -1))[:, :k_max]
        yield start, idx.to(device)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """`None` or a positive int."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size
