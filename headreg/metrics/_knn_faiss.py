"""k-NN back end: faiss `IndexFlatIP` (CPU; `knn_backend="faiss"`), ties in faiss's own order."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from headreg.errors import InvalidValueError


def iter_faiss(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k_all: torch.Tensor,
    self_index: torch.Tensor | None,
    chunk_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """`_knn.iter_ranked_neighbours`'s contract through faiss (inner product = cosine here).

    Args:
        query: `(Q, D)` L2-normalised query embeddings.
        gallery: `(N_g, D)` L2-normalised gallery embeddings.
        k_all: `(Q,)` int64 neighbours per query, already clamped to what each may match.
        self_index: `(Q,)` int64 index of each query in the gallery (`-1`: none), or `None`.
        chunk_size: queries per search (at least 256 are searched at once).

    Yields:
        `(start, neighbours)`, as `iter_ranked_neighbours`.
    """
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
