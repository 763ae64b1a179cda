"""k-NN back end: the symmetric leave-one-out scan (CPU, float32), about half the matrix products.

With query set = gallery the similarity matrix is symmetric, so each tile above the diagonal
is computed once and scanned for its rows and for its columns, each against its own side's
thresholds (`_knn_cpu.row_and_column_keys`). Two passes over blocks of `block` items:

1. Strip: every block of rows against the threshold sample (the first `m` items of the
   layout) gives all thresholds, the candidates of every row among the sample's columns,
   and, read by column, the candidates of the sample's rows among the other items. The
   sample's rows are then complete.
2. Square: for the other items, blocks `(I, J)` with `J >= I` are scanned by row (for block
   `I`) and by column (for block `J`); block `I` is complete after its row of tiles. With
   the gallery grouped by label, a block's candidates come from blocks nearby, so few wait
   in memory.

A complete block goes through steps 3 and 4 (`_knn_cpu.KeyCandidates`) and is handed on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from headreg.metrics._knn_base import Layout, ScanSettings, Stages, exclude_self, kth_largest_numpy, sample_rank
from headreg.metrics._knn_cpu import KeyCandidates, row_and_column_keys, row_keys

# A unit of the scan's work: candidate keys per destination block, and that unit's stage times.
_Work = tuple[list[tuple[int, np.ndarray]], dict[str, float] | None]


class SelfScan:
    """The two passes, on `block`-item blocks of a sampled `Layout`.

    With more than one torch thread the tiles go to as many worker threads, one torch thread
    each (the matmul and the compiled scan release the GIL); this thread files their
    candidates, ranks finished blocks and hands them on. Stage times are then thread-seconds.

    Args:
        layout: the layout of the `(N, D)` float32 embeddings, with a threshold sample.
        k: `(N,)` int64 neighbours wanted per item, in original order; `0`: not a query.
        block: items per block.
        settings: the scan's tunables.
        stages: the stage timer.
    """

    def __init__(self, layout: Layout, k: torch.Tensor, block: int, settings: ScanSettings, stages: Stages) -> None:
        self.layout, self.block, self.settings, self.stages = layout, block, settings, stages
        self.cands = KeyCandidates(layout, settings, np.empty(0, dtype=np.int64))
        self.local = threading.local()
        n, m = layout.size, layout.num_sampled
        self.k = k.cpu()[layout.col_to_orig]  # in layout order
        # Blocks of rows (and columns): the sample's, then the others', each aligned to its start.
        self.starts = [*range(0, m, block), *range(m, n, block)]
        self.ends = [min(s + block, m if s < m else n) for s in self.starts]
        self.pending: dict[int, list[np.ndarray]] = {i: [] for i in range(len(self.starts))}
        self.thr = np.full(n, np.inf, dtype=np.float32)

    def run(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(items, neighbours)` block by block: original indices and their ranked neighbours."""
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
            self.stages.add(times)

    def _buffers(self) -> SimpleNamespace:
        """This thread's buffers: a tile, the sample strip and its partition scratch, the key outputs."""
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            b, m = self.block, self.layout.num_sampled
            bufs = self.local.bufs = SimpleNamespace(
                tile=torch.empty(b, b, dtype=torch.float32),
                strip=torch.empty(b, m, dtype=torch.float32),
                scratch=torch.empty(b, m, dtype=torch.float32),
                keys=(np.empty(b * b, dtype=np.int64), np.empty(b * b, dtype=np.int64)),
            )
        return bufs

    # -- pass 1 ------------------------------------------------------------------------------

    def _strip(self, i: int, sample: list[int]) -> _Work:
        """Pass 1 for block `i`: its similarities to the sample, thresholds, and candidates both ways."""
        stages = self.stages.child()
        with stages("threshold"):
            sims = self._strip_thresholds(i)
        r0, m, parts = self.starts[i], self.layout.num_sampled, []
        with stages("select"):
            for j in sample:  # column blocks of the sample: a column's candidates go to its block
                c0, c1 = self.starts[j], self.ends[j]
                parts += self._scan(sims[:, c0:c1], i, r0, c0, j if r0 >= m else None)
        return parts, stages.stats

    def _strip_thresholds(self, i: int) -> np.ndarray:
        """Block `i`'s `(rows, m)` similarities to the sample; sets its rows' thresholds (`inf`: no query)."""
        layout, bufs = self.layout, self._buffers()
        n, m = layout.size, layout.num_sampled
        r0, r1 = self.starts[i], self.ends[i]
        sims = torch.mm(layout.gallery[r0:r1], layout.gallery[:m].T, out=bufs.strip[: r1 - r0])
        if r0 < m:
            exclude_self(sims, torch.arange(r0, r1), 0)
        k = self.k[r0:r1]
        j = sample_rank(k.clamp(min=1), m, n, self.settings.sample_z)
        thr = kth_largest_numpy(sims, j, bufs.scratch[: r1 - r0])
        self.thr[r0:r1] = np.where(k.numpy() > 0, thr.clamp(min=-2.0).numpy(), np.inf)
        return sims.numpy()

    # -- pass 2 ------------------------------------------------------------------------------

    def _tile(self, bi: int, bj: int) -> _Work:
        """Pass 2: tile `(bi, bj)` of the square, `bj >= bi`, scanned by row and (above the diagonal) by column."""
        stages = self.stages.child()
        with stages("matmul"):
            sims = self._tile_similarities(bi, bj)
        with stages("select"):
            if bi == bj:
                np.fill_diagonal(sims, -np.inf)  # never its own neighbour
            parts = self._scan(sims, bi, self.starts[bi], self.starts[bj], None if bi == bj else bj)
        return parts, stages.stats

    def _tile_similarities(self, bi: int, bj: int) -> np.ndarray:
        g, tile = self.layout.gallery, self._buffers().tile
        r0, r1, c0, c1 = self.starts[bi], self.ends[bi], self.starts[bj], self.ends[bj]
        out = tile if (r1 - r0, c1 - c0) == tuple(tile.shape) else None
        return torch.mm(g[r0:r1], g[c0:c1].T, out=out).numpy()

    def _scan(self, a: np.ndarray, bi: int, r0: int, c0: int, bj: int | None = None) -> list[tuple[int, np.ndarray]]:
        """Candidates of tile rows `r0:` (for block `bi`), and with `bj` of its columns `c0:` (for block `bj`)."""
        rows, cols = a.shape
        c2o, keys, bufs = self.cands.c2o, self.cands.keys, self._buffers().keys
        thr_r, orig_c = self.thr[r0 : r0 + rows], c2o[c0 : c0 + cols]
        if bj is None:
            return [(bi, row_keys(a, thr_r, orig_c, keys, bufs[0]))]
        by_row, by_col = row_and_column_keys(
            a, thr_r, self.thr[c0 : c0 + cols], c2o[r0 : r0 + rows], orig_c, keys, bufs
        )
        return [(bi, by_row), (bj, by_col)]

    # -- a complete block ----------------------------------------------------------------------

    def _finish(self, i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Block `i` is complete: steps 3 and 4, then yield its querying items."""
        r0, r1 = self.starts[i], self.ends[i]
        k = self.k[r0:r1]
        parts = self.pending.pop(i) or [np.empty(0, dtype=np.int64)]
        k_max = int(k.max())
        if k_max == 0:
            return
        with self.stages("select"):
            keys, num_fallback = self.cands.complete(parts, k, self.layout.gallery[r0:r1], torch.arange(r0, r1))
        self.stages.count("fallback_rows", num_fallback)
        with self.stages("sort"):
            nbr = self.cands.rank(keys, k, k_max)
        keep = (k > 0).nonzero().squeeze(1)
        yield self.layout.col_to_orig[r0:r1][keep], nbr[keep]
