"""What the k-NN back ends share: the gallery layout, the key layout, the thresholds, the stage timer.

`_knn` (the interface) builds a `Layout` once, picks a back end, and times each of its calls
with `Stages`. The per-query back ends (`_knn_cpu.CpuTileScan`, `_knn_torch.TorchScan`) follow
the `TileScan` protocol: one method per step of `_knn`'s module docstring. The leave-one-out
scan (`_knn_self.SelfScan`) has its own two passes but the same layout, keys and timer.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

# The keys of `stats`: seconds per stage, and the number of rows that needed the exact fallback.
STAGES = ("matmul", "threshold", "select", "sort", "fallback_rows")
_NO_TIMING = nullcontext()


class Stages:
    """Adds up seconds per stage around the calls a driver times; the arithmetic never sees it.

    ```
    with stages("matmul"):
        sims = scan.similarities(q, col0)
    ```

    With `stats=None` nothing is timed (`stages(...)` is a shared no-op context). On a CUDA
    device each span synchronises first, so that it measures the kernels and not their launch.
    Spans do not nest, and a `Stages` belongs to one thread: the leave-one-out scan gives each
    unit of work a `child()` and adds its times up on the calling thread.
    """

    def __init__(self, stats: dict[str, float] | None, device: torch.device | None = None) -> None:
        self.stats = stats
        if stats is not None:
            for key in STAGES:
                stats.setdefault(key, 0.0)
        self._cuda = device if device is not None and device.type == "cuda" else None
        self._key = ""
        self._t0 = 0.0

    def __call__(self, stage: str) -> AbstractContextManager[object]:
        if self.stats is None:
            return _NO_TIMING
        self._key = stage
        return self

    def __enter__(self) -> Stages:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.stats[self._key] += time.perf_counter() - self._t0

    def _sync(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    def count(self, key: str, n: int) -> None:
        """Add `n` to a counting key (`fallback_rows`)."""
        if self.stats is not None:
            self.stats[key] += float(n)

    def child(self) -> Stages:
        """A fresh timer for one unit of work on another thread (no-op when this one is)."""
        return Stages(None if self.stats is None else {}, self._cuda)

    def add(self, times: dict[str, float] | None) -> None:
        """Add a child's `stats` into this one's."""
        if self.stats is not None and times is not None:
            for key, value in times.items():
                self.stats[key] += value


@dataclass(frozen=True)
class ScanSettings:
    """The tunables a scan reads, fixed when a search starts (`_knn` holds their values).

    Attributes:
        sample_z: z-score of the sampled threshold: larger means fewer fallbacks, more candidates.
        fallback_bytes: bytes of full similarity rows the exact fallback may hold at once.
    """

    sample_z: float
    fallback_bytes: int


@dataclass(frozen=True)
class KeyLayout:
    """One int64 key per candidate: `(row << shift) | (desc << col_bits) | original index`.

    `desc` orders similarities descending (see `_kernels`), so ascending keys are: row, then
    similarity descending, then original gallery index ascending: the tie rule, in one sort.
    """

    col_bits: int

    @classmethod
    def for_gallery(cls, size: int) -> KeyLayout:
        return cls(max(1, (size - 1).bit_length()))

    @property
    def shift(self) -> int:
        return 32 + self.col_bits

    def fits(self, rows: int) -> bool:
        """Whether keys of up to `rows` rows fit in 63 bits."""
        return max(1, (rows - 1).bit_length()) + self.shift <= 63


class Layout:
    """Step 0: the gallery shuffled, grouped, with a threshold sample spread over the groups in front.

    Items are shuffled (seeded), stably sorted by group, and every `stride`-th item of that
    order is moved to the front (`num_sampled` items; none with `stride=0`). The layout only
    changes speed, never the result. `col_to_orig[c]` is the original index of column `c`,
    `orig_to_col` its inverse; `gallery` is `(N, D)` in column order.
    """

    def __init__(self, gallery: torch.Tensor, groups: torch.Tensor | None, seed: int, stride: int) -> None:
        n, device = gallery.shape[0], gallery.device
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(n, generator=gen)
        if groups is not None:
            order = order[torch.argsort(groups.cpu()[order], stable=True)]
        self.num_sampled = 0
        if stride:
            in_sample = torch.zeros(n, dtype=torch.bool)
            in_sample[::stride] = True
            order = torch.cat([order[in_sample], order[~in_sample]])
            self.num_sampled = int(in_sample.sum())
        self.size = n
        self.col_to_orig = order.to(device)
        self.orig_to_col = torch.empty(n, dtype=torch.long, device=device)
        self.orig_to_col[self.col_to_orig] = torch.arange(n, device=device)
        self.gallery = gallery[self.col_to_orig].contiguous()


Candidates = TypeVar("Candidates")


class TileScan(Protocol[Candidates]):
    """A per-query back end: steps 1-4 of `_knn`'s module docstring, one chunk of queries at a time.

    `q` is a `(rows, D)` chunk of queries, `k` its `(rows,)` int64 `K_q` (all >= 1), `own`
    the `(rows,)` layout column of each query's own entry (`-1`: none). Columns are layout
    columns. The driver (`_knn._scan_chunk`) calls the steps in order and times them.
    """

    first_width: int  # columns of step 1's block: the sample, or the whole of a small gallery
    size: int  # gallery items
    tile: int  # gallery items per tile of step 2

    def thresholds(self, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: `(rows, first_width)` similarities to the first block (own entry -inf), `(rows,)` thresholds."""
        ...

    def similarities(self, q: torch.Tensor, col0: int) -> torch.Tensor:
        """Step 2, product: `(rows, width)` similarities to the tile starting at column `col0`."""
        ...

    def select(
        self, sims: torch.Tensor, thresh: torch.Tensor, col0: int, own: torch.Tensor | None = None
    ) -> Candidates:
        """Step 2, compare: the entries `>= thresh[r]` of a block at column `col0` (after `own` is excluded)."""
        ...

    def complete(
        self, parts: list[Candidates], k: torch.Tensor, q: torch.Tensor, own: torch.Tensor
    ) -> tuple[Candidates, int]:
        """Step 3: all candidates, rows with fewer than `k_r` redone exactly; and how many were."""
        ...

    def rank(self, cands: Candidates, k: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: `(rows, k_max)` original indices of each row's `k_r` best candidates (padded with -1), and
        their similarities (padded with -inf): the values that ranked them, bit for bit."""
        ...


def sample_rank(k: torch.Tensor, m: int, n: int, z: float) -> torch.Tensor:
    """`j_q` of step 1: the rank in the `m`-item sample whose value is, usually, below the `K_q`-th of `n`."""
    e = k.double() * (m / n)
    return ((e + z * e.sqrt()).ceil().long() + 1).clamp(min=1, max=m)


def first_block(
    layout: Layout, q: torch.Tensor, k: torch.Tensor, own: torch.Tensor, buf: torch.Tensor, sample_z: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1's block: ``q`` against the sampled (or whole) gallery in ``buf``, self excluded, and each row's rank `j`.

    The thresholds are then the `j`-th largest value of each row (each back end has its own selection).
    """
    first = torch.mm(q, layout.gallery[: buf.shape[1]].T, out=buf[: q.shape[0]])
    exclude_self(first, own, 0)
    m = layout.num_sampled
    return first, (sample_rank(k, m, layout.size, sample_z) if m else k)


def exclude_self(sims: torch.Tensor, own: torch.Tensor, col0: int) -> None:
    """Set `sims[r, own[r] - col0]` to -inf where that column is inside `sims` (`(rows, width)`)."""
    rel = own - col0
    hit = (rel >= 0) & (rel < sims.shape[1])
    if bool(hit.any()):
        r = hit.nonzero().squeeze(1)
        sims[r, rel[r]] = float("-inf")


def kth_largest_numpy(sim: torch.Tensor, j: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The exact `j_r`-th largest value of each row `r` of a CPU `sim` (`1 <= j_r <= width`), `(rows,)`.

    numpy's partition (SIMD) is several times faster than `torch.topk` on a CPU; it works in
    `scratch` (same shape as `sim`) when given, which saves a fresh allocation per call.
    """
    j_max = int(j.max())
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


def kth_largest_torch(sim: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """`kth_largest_numpy` on any device, by `torch.topk`."""
    top = torch.topk(sim, int(j.max()), dim=1, sorted=True).values
    return top.gather(1, (j - 1).unsqueeze(1)).squeeze(1)


def tile_similarities(q: torch.Tensor, gallery: torch.Tensor, col0: int, tile: int, buf: torch.Tensor) -> torch.Tensor:
    """`q @ gallery[col0:col0+tile]^T`, `(rows, width)`, into `buf` when it has that shape."""
    block = gallery[col0 : min(col0 + tile, gallery.shape[0])]
    if buf.shape == (q.shape[0], block.shape[0]):
        return torch.mm(q, block.T, out=buf)
    return torch.mm(q, block.T)
