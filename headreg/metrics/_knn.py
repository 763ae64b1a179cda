"""Exact, chunked k-nearest-neighbour search by cosine similarity, with a per-query k.

The retrieval metrics need, for each query `q`, its `K_q` nearest gallery items in
exact order, where `K_q = max(R_q, k_small)` varies from query to query (`R_q`, the
number of positives, reaches ~1,000 at N = 100,000 with 100 classes). A `torch.topk`
with k = max K over whole rows costs about twice the similarity matmul itself on a
CPU, so this search never ranks whole rows; it keeps only the entries above a
per-query threshold, and on a CPU it does so while each piece of the similarity
matrix is still in the core's cache:

0. Layout (once, `_knn_base.Layout`): the gallery is shuffled (seeded) and stably sorted
   by `gallery_groups` (the labels, when the caller has them); every `_SAMPLE_STRIDE`-th
   item of that order, a sample spread evenly over the groups, is moved to the front
   (`m` items). The layout only changes speed, never the result.

Then, per chunk of queries (`_scan_chunk`, one call of the back end per step):

1. `thresholds`: the sample's similarities `Q_c @ G[:m]^T` give each query a threshold
   `t_q`: the `j_q`-th largest of them, with `j_q = ceil(e + z·sqrt(e)) + 1` and
   `e = K_q·m/N` the expected count, so that usually `count(S_q ≥ t_q) ≥ K_q`. Below
   `_MIN_SAMPLED_GALLERY` items `t_q` is the exact `K_q`-th value instead.
2. `similarities` and `select`: the rest of the gallery goes by in tiles of `tile` items:
   each tile's similarities (`chunk × tile` floats, 2 MiB by default on a CPU: the whole
   `chunk × N` block never goes out to memory) are compared with `t` and only the entries
   `≥ t_q` are kept, with their row and column. The candidates are exactly `{S_q ≥ t_q}`.
3. `complete`: every row's count is checked: where it is at least `K_q`, `t_q` is a proven
   lower bound of the `K_q`-th largest similarity, so the candidates contain the exact top
   `K_q`. Rows that fail (rare, or forced in tests) are recomputed against the whole
   gallery with their exact `K_q`-th value.
4. `rank`: only the candidates (~1.4 K_q per row) are sorted, on one int64 key each
   (row, then similarity descending, then original gallery index ascending,
   `_knn_base.KeyLayout`), in one sort per chunk.

The back ends, each in its own module behind this one (callers import only `_knn`):

- `_knn_cpu.CpuTileScan` (float32 on a CPU): step 2's compare is one compiled pass per
  tile while it is in cache (`_kernels.scan_tile`, numba), which writes step 4's keys
  directly; thresholds, counts and sorts run in numpy on zero-copy views.
- `_knn_torch.TorchScan` (GPUs, float64, keys over 63 bits): the same steps in torch,
  with the whole gallery as one tile on a GPU.
- `_knn_self.SelfScan`, leave-one-out (`iter_self_neighbours`) on a CPU: the similarity
  matrix is symmetric, so each tile above the diagonal is computed once and scanned for
  its rows and for its columns, against each side's threshold: about half the matrix
  products. It shares the layout and steps 3 and 4 (`_knn_cpu.KeyCandidates`).
- `_knn_faiss` (`backend="faiss"`): a faiss `IndexFlatIP`, ties in faiss's own order.

Stage times (`stats=`) are taken by a `_knn_base.Stages` wrapped around the back end's
calls, never inside them: seconds in `matmul`, `threshold`, `select`, `sort`, and the
count of `fallback_rows`.

Ties: two gallery items with bit-identical similarity are ranked by their original
gallery index, lower first, whatever the device, chunking or layout. A query is never
its own neighbour (`self_index`), even when a duplicate has the same similarity.

Memory: O(chunk × tile) for the similarity tile, O(chunk × N/_SAMPLE_STRIDE) for the
sample, and the candidates (~1.4 chunk × K); neighbours are yielded chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from headreg.errors import InvalidValueError
from headreg.metrics._knn_base import (
    KeyLayout,
    Layout,
    ScanSettings,
    Stages,
    TileScan,
    kth_largest_numpy,
    kth_largest_torch,
)
from headreg.metrics._knn_faiss import iter_faiss
from headreg.metrics._knn_torch import TorchScan

__all__ = [
    "KNN_BACKENDS",
    "iter_ranked_neighbours",
    "iter_self_neighbours",
    "plan_chunks",
    "self_scan_applies",
    "similarity_tiles",
]

# z-score of the sampled threshold: larger means fewer fallbacks but more candidates to sort.
#: The search back ends of ``knn_backend=`` (``headreg eval --knn``).
KNN_BACKENDS = ("torch", "faiss")

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


def _numpy_ok(t: torch.Tensor) -> bool:
    """Whether the CPU fast path (numpy: SIMD sort, partition and compare) applies."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad


def _settings() -> ScanSettings:
    """The tunables as they are now (tests change them on this module)."""
    return ScanSettings(sample_z=_SAMPLE_Z, fallback_bytes=_FALLBACK_BYTES)


def _tile_scan(layout: Layout, chunk: int, tile: int) -> TileScan:
    """The per-query back end for this gallery: the compiled CPU scan where it applies, else torch."""
    g = layout.gallery
    if _numpy_ok(g) and g.dtype == torch.float32 and KeyLayout.for_gallery(layout.size).fits(chunk):
        from headreg.metrics._knn_cpu import CpuTileScan  # noqa: PLC0415 - imports numba on first use

        return CpuTileScan(layout, chunk, tile, _settings())
    kth = kth_largest_numpy if _numpy_ok(g) else kth_largest_torch
    return TorchScan(layout, chunk, tile, _settings(), kth)


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
    auto_chunk, auto_tile = plan_chunks(num_gallery, device)
    chunk_size = chunk_size or auto_chunk
    if backend == "faiss":
        yield from iter_faiss(query, gallery, clamp_k(k_per_query, self_index, num_gallery), self_index, chunk_size)
        return
    if backend != "torch":
        raise InvalidValueError(f"knn_backend must be one of {', '.join(KNN_BACKENDS)}, got {backend!r}")
    search = GallerySearch(
        gallery, chunk_size=chunk_size, tile_size=tile_size or auto_tile, seed=seed, stats=stats, groups=gallery_groups
    )
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        own = None if self_index is None else self_index[start:stop]
        yield start, search.search(query[start:stop], k_per_query[start:stop], own)[0]


def clamp_k(k_per_query: torch.Tensor, self_index: torch.Tensor | None, num_gallery: int) -> torch.Tensor:
    """`K_q` clamped to `[1, items the query may match]` (`N_g`, less its own entry); 0 for an empty gallery."""
    k = k_per_query.clamp(min=1)
    available = torch.full_like(k, num_gallery)
    if self_index is not None:
        available -= (self_index.to(k.device) >= 0).long()
    return torch.minimum(k, available).clamp(min=0)


class GallerySearch:
    """`iter_ranked_neighbours`'s exact search over one gallery, for query chunks that arrive one at a time.

    The layout (step 0) and the back end are built once; `search` runs steps 1-4 on one chunk.
    The gallery-sharded evaluation (`engine/_shard_eval.py`) keeps one per rank, over that
    rank's part of the gallery, and feeds it every chunk of queries.

    Args:
        gallery: `(N_g, D)` float gallery embeddings, L2-normalised unless `normalize`.
        chunk_size: the most queries one `search` call receives.
        tile_size: gallery items per similarity tile.
        seed, stats, groups: as `iter_ranked_neighbours` (`groups` = `gallery_groups`).
        normalize: L2-normalise the layout's own copy of the gallery in place (the caller's tensor is
            untouched), so that the gallery is held once more, not twice; `rows` then gives normalised rows.
    """

    def __init__(
        self,
        gallery: torch.Tensor,
        *,
        chunk_size: int,
        tile_size: int,
        seed: int = 0,
        stats: dict[str, float] | None = None,
        groups: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> None:
        self.size = gallery.shape[0]
        self.device = gallery.device
        sampled = self.size >= _MIN_SAMPLED_GALLERY
        self.layout = Layout(gallery, groups, seed, stride=_SAMPLE_STRIDE if sampled else 0)
        if normalize:  # row by row, the same bits as normalising the caller's tensor first
            F.normalize(self.layout.gallery, dim=1, out=self.layout.gallery)
        self.scan = _tile_scan(self.layout, chunk_size, tile_size)
        self.stages = Stages(stats, self.device)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The gallery items `index` (original indices), as the search holds them, `(len(index), D)`."""
        return self.layout.gallery[self.layout.orig_to_col[index]]

    def search(
        self, query: torch.Tensor, k_per_query: torch.Tensor, self_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `K_q` nearest gallery items of each query of one chunk, with their similarities.

        Args:
            query: `(rows, D)` L2-normalised queries, `rows <= chunk_size`, same device and dtype as the gallery.
            k_per_query: `(rows,)` int64 neighbours wanted (clamped as in `iter_ranked_neighbours`).
            self_index: `(rows,)` int64 index of each query inside the gallery, `-1` for none; or `None`.

        Returns:
            `(neighbours, similarities)`, both `(rows, L)`: gallery indices best first, padded with `-1`,
            and their similarities (the very values that ranked them), padded with `-inf`.
        """
        rows, device = query.shape[0], self.device
        k = clamp_k(k_per_query.to(device), self_index, self.size)
        k_max = int(k.max()) if rows else 0
        if k_max == 0:
            empty = torch.full((rows, 0), -1, dtype=torch.long, device=device)
            return empty, torch.zeros((rows, 0), dtype=query.dtype, device=device)
        # Column of each query's own entry in the layout, -1 for none.
        own = torch.full((rows,), -1, dtype=torch.long, device=device)
        if self_index is not None:
            s = self_index.to(device)
            own = torch.where(s >= 0, self.layout.orig_to_col[s.clamp(min=0)], own)
        return _scan_chunk(self.scan, self.stages, query, k, k_max, own)


def _scan_chunk(
    scan: TileScan, stages: Stages, q: torch.Tensor, k: torch.Tensor, k_max: int, own: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 of the module docstring for one chunk: `(rows, k_max)` original indices (padded with -1), values.

    Args:
        scan: the back end.
        stages: times each step.
        q: `(rows, D)` queries.
        k: `(rows,)` int64 neighbours wanted per query, at most `k_max`.
        k_max: `max(k)`, at least 1.
        own: `(rows,)` layout column of each query's own entry, `-1` for none.
    """
    with stages("threshold"):
        first, thresh = scan.thresholds(q, k, own)
    # The first block is also the candidates' source for its own columns (self already excluded).
    with stages("select"):
        parts = [scan.select(first, thresh, 0)]
    for col0 in range(scan.first_width, scan.size, scan.tile):
        with stages("matmul"):
            sims = scan.similarities(q, col0)
        with stages("select"):
            parts.append(scan.select(sims, thresh, col0, own))
    with stages("select"):
        cands, num_fallback = scan.complete(parts, k, q, own)
    stages.count("fallback_rows", num_fallback)
    with stages("sort"):
        return scan.rank(cands, k, k_max)


def self_scan_applies(x: torch.Tensor, block: int = _CPU_CHUNK) -> bool:
    """Whether `iter_self_neighbours` runs its symmetric scan for these embeddings (else it delegates)."""
    n = x.shape[0]
    fits = KeyLayout.for_gallery(n).fits(block)
    return _numpy_ok(x) and x.dtype == torch.float32 and n >= _MIN_SAMPLED_GALLERY and fits


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

    The same neighbours as `iter_ranked_neighbours(x, x, k, arange(N))`. On a CPU, in float32,
    from `_MIN_SAMPLED_GALLERY` items, it runs the symmetric scan (`_knn_self.SelfScan`):
    each tile above the diagonal is computed once and serves both its rows and its columns.
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
    from headreg.metrics._knn_self import SelfScan  # noqa: PLC0415 - imports numba on first use

    layout = Layout(x, groups, seed, stride=_SAMPLE_STRIDE)
    yield from SelfScan(layout, k_all, block, _settings(), Stages(stats)).run()
