"""Exact, chunked k-nearest-neighbour search by cosine similarity, with a per-query k.

The retrieval metrics need, for each query `q`, its `K_q` nearest gallery items in
exact order, where `K_q = max(R_q, k_small)` varies from query to query (`R_q`, the
number of positives, reaches ~1,000 at N = 100,000 with 100 classes). A `torch.topk`
with k = max K over whole rows costs about twice the similarity matmul itself on a
CPU, so this module avoids it:

1. Similarities of a chunk of queries against the whole gallery: `S = Q_c @ G^T`,
   `(chunk, N_g)`, never `N × N`.
2. A per-row threshold `t_q` estimated from a random column sample: the gallery is
   permuted once (seeded), so the first `m = N_g / stride` columns of `S` are a
   uniform sample; `t_q` is the `j_q`-th largest sampled value with
   `j_q = ceil(K_q/stride + z·sqrt(K_q/stride)) + 1`, slightly more than the expected
   count, so usually `count(S_q ≥ t_q) ≥ K_q`.
3. The candidates `S ≥ t` are extracted, and every row's count is checked: where it is
   at least `K_q`, `t_q` is a proven lower bound of the `K_q`-th largest similarity,
   so the candidates contain the exact top `K_q`. Rows that fail (rare, or forced in
   tests) fall back to the exact `K_q`-th value from `torch.topk` on those rows only.
4. Only the candidates (~1.3 K_q per row) are sorted, with one integer key per
   candidate packing (row, similarity descending, original gallery index ascending).

Ties: two gallery items with bit-identical similarity are ranked by their original
gallery index, lower first, whatever the device or chunking. A query is never its
own neighbour (`self_index`), even when a duplicate has the same similarity.

Memory: O(chunk × N_g) for `S` and its mask plus O(chunk × K) candidates; the whole
result is never held: neighbours are yielded chunk by chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from headreg.errors import InvalidValueError

__all__ = ["iter_ranked_neighbours", "default_chunk_size"]

# z-score of the sampled threshold: larger means fewer fallbacks but more candidates to sort.
_SAMPLE_Z = 3.0
# Sample one column in `_SAMPLE_STRIDE`; below `_MIN_SAMPLED_GALLERY` rows the whole row is used.
_SAMPLE_STRIDE = 16
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
        seed: seeds the column permutation used to sample thresholds.
        stats: if given, receives seconds spent per stage and the number of fallback rows.

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
    # The sort key packs row | 32 bits of similarity | column into a signed int64.
    max_rows = 2 ** max(0, 63 - 32 - col_bits)
    chunk_size = int(max(1, min(chunk_size, max_rows)))
    if num_gallery >= _MIN_SAMPLED_GALLERY:
        stride = _SAMPLE_STRIDE
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(num_gallery, generator=gen).to(device)
        gallery_p = gallery[perm]
    else:
        stride, perm, gallery_p = 1, None, gallery
    num_sample = num_gallery // stride
    sim_buf = torch.empty(chunk_size, num_gallery, dtype=gallery.dtype, device=device)
    # Even width so the difference buffer can be read as int64 words of two floats.
    diff_buf = torch.zeros(chunk_size, num_gallery + num_gallery % 2, dtype=gallery.dtype, device=device)
    inv_perm = None
    if perm is not None and self_index is not None:
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(num_gallery, device=device)
    timing = stats if stats is not None else {}
    for key in ("matmul", "threshold", "select", "sort", "fallback_rows"):
        timing.setdefault(key, 0.0)
    clock = time.perf_counter if stats is not None else None

    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        rows = stop - start
        k = k_all[start:stop]
        t0 = _tick(clock, device)
        sim = sim_buf[:rows]
        torch.mm(query[start:stop], gallery_p.T, out=sim)
        if self_index is not None:
            own = self_index[start:stop]
            has = own >= 0
            cols = own[has] if inv_perm is None else inv_perm[own[has]]
            # -inf ranks the query itself below every real item; thresholds stay finite.
            sim[torch.arange(rows, device=device)[has], cols] = float("-inf")
        t1 = _tick(clock, device)
        k_max = int(k.max()) if rows else 0
        if k_max == 0:
            yield start, torch.full((rows, 0), -1, dtype=torch.long, device=device)
            continue
        if stride == 1:
            thresh = _exact_kth(sim, k, k_max)
        else:
            expect = k.double() / stride
            j = (expect + _SAMPLE_Z * expect.sqrt()).ceil().long() + 1
            j = j.clamp(min=1, max=num_sample)
            top = torch.topk(sim[:, :num_sample], int(j.max()), dim=1, sorted=True).values
            thresh = top.gather(1, (j - 1).unsqueeze(1)).squeeze(1)
        # Cosines are >= -1; this keeps the -inf self entry out of every candidate set.
        thresh = thresh.clamp(min=-2.0)
        t2 = _tick(clock, device)
        row, col = _select(sim, thresh, diff_buf[:rows])
        counts = torch.bincount(row, minlength=rows)
        bad = counts < k
        if bool(bad.any()):
            bad_rows = bad.nonzero().squeeze(1)
            timing["fallback_rows"] += float(bad_rows.numel())
            exact = _exact_kth(sim[bad_rows], k[bad_rows], int(k[bad_rows].max()))
            keep_old = ~bad[row]
            row_b, col_b = _select(sim[bad_rows], exact.clamp(min=-2.0))
            row = torch.cat([row[keep_old], bad_rows[row_b]])
            col = torch.cat([col[keep_old], col_b])
        t3 = _tick(clock, device)
        vals = sim[row, col]
        orig = col if perm is None else perm[col]
        key = (row << (32 + col_bits)) | (_ordered_desc_bits(vals) << col_bits) | orig
        key = torch.sort(key).values
        row_s = key >> (32 + col_bits)
        orig_s = key & ((1 << col_bits) - 1)
        # Position of each sorted candidate inside its own row.
        row_start = torch.cumsum(torch.bincount(row_s, minlength=rows), 0) - torch.bincount(row_s, minlength=rows)
        pos = torch.arange(key.numel(), device=device) - row_start[row_s]
        keep = pos < k[row_s]
        out = torch.full((rows, k_max), -1, dtype=torch.long, device=device)
        out[row_s[keep], pos[keep]] = orig_s[keep]
        t4 = _tick(clock, device)
        if clock is not None:
            timing["matmul"] += t1 - t0
            timing["threshold"] += t2 - t1
            timing["select"] += t3 - t2
            timing["sort"] += t4 - t3
        yield start, out


def _tick(clock: object, device: torch.device) -> float:
    if clock is None:
        return 0.0
    _sync(device)
    return time.perf_counter()


def _exact_kth(sim: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """The exact `k_r`-th largest value of each row `r` of `sim`, `(rows,)`."""
    top = torch.topk(sim, k_max, dim=1, sorted=True).values
    return top.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def _select(
    sim: torch.Tensor, thresh: torch.Tensor, diff: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every entry with `sim >= thresh[:, None]`, row-major (columns ascending).

    Args:
        sim: `(c, N)` float32 similarities.
        thresh: `(c,)` per-row thresholds.
        diff: optional `(c, N + N % 2)` scratch buffer, zero in its padding column.

    On a CPU, comparison ops that produce bool and `nonzero` over bytes are the slow part
    (slower than half the matmul). So the test is done in float arithmetic instead:
    `relu(sim - t')` with `t'` the float just below `t` is non-zero exactly when
    `sim >= t` (an IEEE difference is zero only for equal operands), and `nonzero` runs
    over int64 words holding two floats each, then expands only the words that hit.
    """
    rows, n = sim.shape
    if diff is None:
        diff = torch.zeros(rows, n + n % 2, dtype=sim.dtype, device=sim.device)
    below = torch.nextafter(thresh, torch.full_like(thresh, float("-inf"))).unsqueeze(1)
    d = diff[:, :n]
    torch.sub(sim, below, out=d)
    d.clamp_min_(0.0)
    hit_row, hit_word = diff.view(torch.int64).nonzero().unbind(1)
    pair = diff.view(rows, -1, 2)[hit_row, hit_word]
    which_hit, which = (pair > 0).nonzero().unbind(1)
    return hit_row[which_hit], hit_word[which_hit] * 2 + which


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
