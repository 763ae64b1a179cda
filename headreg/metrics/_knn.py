"""Exact, chunked k-nearest-neighbour search by cosine similarity, with a per-query k.

The retrieval metrics need, for each query `q`, its `K_q` nearest gallery items in
exact order, where `K_q = max(R_q, k_small)` varies from query to query (`R_q`, the
number of positives, reaches ~1,000 at N = 100,000 with 100 classes). A `torch.topk`
with k = max K over whole rows costs about twice the similarity matmul itself on a
CPU, and so does any elementwise pass that writes a `(chunk, N_g)` buffer, so after
the matmul this module reads the similarity buffer once and only touches the few
blocks that can hold a neighbour:

0. Layout (once): the gallery is shuffled (seeded), stably sorted by `gallery_groups`
   (the labels, when the caller has them) and cut into blocks of `_BLOCK` = 16
   consecutive items, stored lane-major: block `j`, lane `i` is column
   `i * num_blocks + j` (`_BlockLayout`). Items of one class share blocks.
1. Similarities of a chunk of queries against the whole gallery: `S = Q_c @ G^T`,
   `(chunk, N_g)`, never `N × N`; then the maximum of every block, one vectorised
   read pass (`S.view(chunk, 16, num_blocks).amax(1)`).
2. A per-row threshold `t_q` estimated from a sample: lane 0 of every block (one item
   in 16, spread evenly over the classes; contiguous columns); `t_q` is its `j_q`-th
   largest value with `j_q = ceil(K_q/16 + z·sqrt(K_q/16)) + 1`, slightly more than the
   expected count, so usually `count(S_q ≥ t_q) ≥ K_q`. Below `_MIN_SAMPLED_GALLERY`
   items `t_q` is the exact `K_q`-th value.
3. Block-max pruning: a block whose maximum is below `t_q` holds no candidate, so only
   the other blocks (on clustered data ~10 % of them) are gathered and tested; the
   candidates are exactly `{S_q ≥ t_q}`. Every row's count is checked: where it is at
   least `K_q`, `t_q` is a proven lower bound of the `K_q`-th largest similarity, so
   the candidates contain the exact top `K_q`. Rows that fail (rare, or forced in
   tests) fall back to the exact `K_q`-th value on those rows only.
4. Only the candidates (~1.6 K_q per row) are sorted, row by row, with one int64 key
   per candidate (similarity descending, original gallery index ascending).

On a CPU, steps 2–4 run in numpy (zero-copy views): its SIMD sort and partition are
3–9× faster than `torch.sort`/`torch.topk`. Other devices use the same steps in torch.

Ties: two gallery items with bit-identical similarity are ranked by their original
gallery index, lower first, whatever the device, chunking or layout. A query is never
its own neighbour (`self_index`), even when a duplicate has the same similarity.

Memory: O(chunk × N_g) for `S` plus O(chunk × N_g / 16) block maxima and the
candidates; the whole result is never held: neighbours are yielded chunk by chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from headreg.errors import InvalidValueError

__all__ = ["iter_ranked_neighbours", "default_chunk_size"]

# z-score of the sampled threshold: larger means fewer fallbacks but more candidates to sort.
_SAMPLE_Z = 3.0
# Gallery items per block of the block-max pruning; also the sampling stride of the threshold.
_BLOCK = 16
# Lanes of each block that form the threshold sample (one gallery item in `_BLOCK / _SAMPLE_LANES`).
_SAMPLE_LANES = 1
# Below this many gallery items the threshold is the exact `K_q`-th value (no sampling).
_MIN_SAMPLED_GALLERY = 4096
# Bytes of similarity buffer a chunk may use when the caller gives no chunk size.
_CHUNK_BYTES = 32 * 2**20


def default_chunk_size(num_gallery: int) -> int:
    """Queries per chunk so that one `(chunk, N_g)` float32 buffer stays near 32 MiB."""
    return int(max(8, min(1024, _CHUNK_BYTES // (4 * max(num_gallery, 1)))))


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
        chunk_size: queries per chunk; `None` picks one from the gallery size.
        backend: `"torch"` (exact, described in the module docstring) or `"faiss"`
            (faiss `IndexFlatIP`, CPU; ties in faiss's own order).
        seed: seeds the gallery shuffle behind the threshold sample (results do not depend on it).
        stats: if given, receives seconds spent per stage and the number of fallback rows.
        gallery_groups: `(N_g,)` optional group (label) of each gallery item; items of one
            group share blocks, which is what makes block-max pruning effective. Speed only.

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
    if chunk_size is None:
        chunk_size = default_chunk_size(num_gallery)
    if backend == "faiss":
        yield from _iter_faiss(query, gallery, k_all, self_index, chunk_size)
        return
    if backend != "torch":
        raise InvalidValueError(f"knn_backend must be 'torch' or 'faiss', got {backend!r}")

    col_bits = max(1, (num_gallery - 1).bit_length())
    layout = _BlockLayout(gallery, gallery_groups, seed)
    b, nb = _BLOCK, layout.num_blocks
    sampled = num_gallery >= _MIN_SAMPLED_GALLERY
    sim_buf = torch.empty(chunk_size, b * nb, dtype=gallery.dtype, device=device)
    bmax_buf = torch.empty(chunk_size, nb, dtype=gallery.dtype, device=device)
    timing = stats if stats is not None else {}
    for key in ("matmul", "threshold", "select", "sort", "fallback_rows"):
        timing.setdefault(key, 0.0)
    clock = time.perf_counter if stats is not None else None
    arange_rows = torch.arange(chunk_size, device=device)

    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        rows = stop - start
        k = k_all[start:stop]
        t0 = _tick(clock, device)
        sim = sim_buf[:rows]
        torch.mm(query[start:stop], layout.gallery.T, out=sim)
        if layout.pad_cols.numel():
            sim.index_fill_(1, layout.pad_cols, float("-inf"))
        if self_index is not None:
            own = self_index[start:stop]
            has = own >= 0
            # -inf ranks the query itself below every real item; thresholds stay finite.
            sim[arange_rows[:rows][has], layout.orig_to_col[own[has]]] = float("-inf")
        t1 = _tick(clock, device)
        k_max = int(k.max()) if rows else 0
        if k_max == 0:
            yield start, torch.full((rows, 0), -1, dtype=torch.long, device=device)
            continue
        blocks = sim.view(rows, b, nb)
        bmax = torch.amax(blocks, 1, out=bmax_buf[:rows])
        if sampled:
            # The first lanes of every block: a sample spread evenly over all groups.
            m = min(_SAMPLE_LANES, b) * nb
            expect = k.double() * m / num_gallery
            j = (expect + _SAMPLE_Z * expect.sqrt()).ceil().long() + 1
            thresh = _kth_largest(sim[:, :m], j.clamp(min=1, max=m))
        else:
            thresh = _kth_largest(sim, k)
        # Cosines are >= -1; this keeps the -inf self and padding entries out of every candidate set.
        thresh = thresh.clamp(min=-2.0)
        t2 = _tick(clock, device)
        row, col, val = _select_blocks(blocks, bmax, thresh)
        counts = torch.bincount(row, minlength=rows)
        bad = counts < k
        if bool(bad.any()):
            bad_rows = bad.nonzero().squeeze(1)
            timing["fallback_rows"] += float(bad_rows.numel())
            exact = _kth_largest(sim[bad_rows], k[bad_rows]).clamp(min=-2.0)
            row_b, col_b, val_b = _select_blocks(blocks[bad_rows], bmax[bad_rows], exact)
            keep_old = ~bad[row]
            row = torch.cat([row[keep_old], bad_rows[row_b]])
            col = torch.cat([col[keep_old], col_b])
            val = torch.cat([val[keep_old], val_b])
            order = torch.argsort(row, stable=True)
            row, col, val = row[order], col[order], val[order]
            counts = torch.bincount(row, minlength=rows)
        t3 = _tick(clock, device)
        out = _rank_candidates(row, layout.col_to_orig[col], val, counts, k, k_max, col_bits)
        t4 = _tick(clock, device)
        if clock is not None:
            timing["matmul"] += t1 - t0
            timing["threshold"] += t2 - t1
            timing["select"] += t3 - t2
            timing["sort"] += t4 - t3
        yield start, out


class _BlockLayout:
    """The gallery reordered into blocks of `_BLOCK` items of one group, stored lane-major.

    Items are shuffled (seeded), then stably sorted by group, and cut into consecutive
    blocks of `_BLOCK`; block `j`, lane `i` (its `i`-th item) goes to column
    `i * num_blocks + j`. So `sim.view(rows, _BLOCK, num_blocks).amax(1)` gives every
    block's maximum with one contiguous, vectorised pass, and columns `[0, num_blocks)`
    (lane 0) are a sample of one item per block, spread evenly over the groups.
    The last block is padded with zero rows whose columns are set to -inf.
    """

    def __init__(self, gallery: torch.Tensor, groups: torch.Tensor | None, seed: int) -> None:
        n, device = gallery.shape[0], gallery.device
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=gen)
        if groups is not None:
            order = order[torch.argsort(groups.cpu()[order], stable=True)]
        order = order.to(device)
        self.num_blocks = nb = -(-n // _BLOCK)
        rank = torch.arange(nb * _BLOCK, device=device)
        col_of_rank = (rank % _BLOCK) * nb + rank // _BLOCK
        self.col_to_orig = torch.full((nb * _BLOCK,), -1, dtype=torch.long, device=device)
        self.col_to_orig[col_of_rank[:n]] = order
        self.orig_to_col = torch.empty(n, dtype=torch.long, device=device)
        self.orig_to_col[order] = col_of_rank[:n]
        self.pad_cols = col_of_rank[n:]
        self.gallery = gallery.new_zeros(nb * _BLOCK, gallery.shape[1])
        self.gallery[col_of_rank[:n]] = gallery[order]


def _tick(clock: object, device: torch.device) -> float:
    if clock is None:
        return 0.0
    _sync(device)
    return time.perf_counter()


def _kth_largest(sim: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The exact `j_r`-th largest value of each row `r` of `sim` (`1 <= j_r <= width`), `(rows,)`.

    On a CPU, numpy's partition and sort (SIMD) are several times faster than `torch.topk`.
    """
    j_max = int(j.max())
    if not _numpy_ok(sim):
        top = torch.topk(sim, j_max, dim=1, sorted=True).values
        return top.gather(1, (j - 1).unsqueeze(1)).squeeze(1)
    a = sim.numpy()
    width = a.shape[1]
    top = np.partition(a, width - j_max, axis=1)[:, width - j_max :]  # the j_max largest, unordered
    top.sort(axis=1)
    return torch.from_numpy(top[np.arange(a.shape[0]), j_max - j.numpy()])


def _numpy_ok(t: torch.Tensor) -> bool:
    """Whether the CPU fast path (numpy: SIMD sort and partition, cheap fancy indexing) applies."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad


def _select_blocks(
    blocks: torch.Tensor, bmax: torch.Tensor, thresh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column and value of every entry with `sim >= thresh[:, None]`, grouped by row.

    Args:
        blocks: `(c, _BLOCK, num_blocks)` contiguous view of the similarities
            (column = lane * num_blocks + block).
        bmax: `(c, num_blocks)` maximum of each block.
        thresh: `(c,)` per-row thresholds.

    A block whose maximum is below the threshold holds no candidate, so only the other
    blocks are gathered and tested; the result is exactly the set `sim >= thresh`.
    """
    rows, b, nb = blocks.shape
    if _numpy_ok(blocks):
        t = thresh.numpy()
        kept = np.flatnonzero(bmax.numpy() >= t[:, None])  # row * nb + block, row-major
        kr = kept // nb
        lane0 = kept + kr * ((b - 1) * nb)  # flat index of each kept block's lane 0 in `blocks`
        vals = blocks.numpy().reshape(-1)[lane0[:, None] + np.arange(b) * nb]  # (kept, b)
        hit = np.flatnonzero(vals >= t[kr][:, None])
        which, lane = np.divmod(hit, b)
        row = kr[which]
        col = lane * nb + (kept[which] - row * nb)
        return torch.from_numpy(row), torch.from_numpy(col), torch.from_numpy(vals.reshape(-1)[hit])
    kr, kb = (bmax >= thresh.unsqueeze(1)).nonzero().unbind(1)
    vals = blocks[kr, :, kb]  # (kept blocks, b)
    which, lane = (vals >= thresh[kr].unsqueeze(1)).nonzero().unbind(1)
    return kr[which], lane * nb + kb[which], vals[which, lane]


def _rank_candidates(
    row: torch.Tensor,
    orig: torch.Tensor,
    val: torch.Tensor,
    counts: torch.Tensor,
    k: torch.Tensor,
    k_max: int,
    col_bits: int,
) -> torch.Tensor:
    """`(c, k_max)` original indices of the best `k_r` candidates of each row, padded with -1.

    Candidates come grouped by row. For float32, each gets one int64 key (similarity
    descending, then original index ascending) in a `(c, max count)` matrix padded with
    the largest int64, sorted row by row (numpy's SIMD sort on a CPU, ~9x `torch.sort`).
    Other dtypes use three stable sorts.
    """
    rows, device = counts.numel(), row.device
    valid = torch.arange(k_max, device=device).unsqueeze(0) < k.unsqueeze(1)
    if val.dtype != torch.float32:
        order = torch.argsort(orig, stable=True)
        order = order[torch.argsort(val[order], descending=True, stable=True)]
        order = order[torch.argsort(row[order], stable=True)]
        row_s = row[order]
        pos = torch.arange(row.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row_s]
        keep = pos < k_max
        out = torch.full((rows, k_max), -1, dtype=torch.long, device=device)
        out[row_s[keep], pos[keep]] = orig[order][keep]
        return torch.where(valid, out, torch.full_like(out, -1))
    width = max(int(counts.max()), k_max)
    mask = (1 << col_bits) - 1
    if _numpy_ok(val):
        r, c = row.numpy(), counts.numpy()
        pos = np.arange(r.size) - (np.cumsum(c) - c)[r]
        bits = (val.numpy() + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0.0: -0.0 ties +0.0
        desc = 0x7FFFFFFF - np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        keys = np.full((rows, width), np.iinfo(np.int64).max, dtype=np.int64)
        keys[r, pos] = (desc << col_bits) | orig.numpy()
        idx = torch.from_numpy(np.sort(keys, axis=1)[:, :k_max] & mask)
        return torch.where(valid, idx, torch.full_like(idx, -1))
    pos = torch.arange(row.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row]
    keys = torch.full((rows, width), torch.iinfo(torch.int64).max, dtype=torch.long, device=device)
    keys[row, pos] = (_ordered_desc_bits(val) << col_bits) | orig
    idx = torch.sort(keys, dim=1).values[:, :k_max] & mask
    return torch.where(valid, idx, torch.full_like(idx, -1))


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
