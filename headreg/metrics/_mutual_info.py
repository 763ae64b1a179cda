"""Mutual information between two labelings: MI, NMI and the chance-adjusted AMI, exact and fast.

The arithmetic follows Vinh, Epps & Bailey (2010), "Information theoretic measures for clusterings
comparison", with scikit-learn's conventions for the limit cases, so the values equal
``sklearn.metrics.{normalized,adjusted}_mutual_info_score`` (to about 1e-12; the tests hold them to 1e-9).

The costly part of AMI is the expected mutual information under the hypergeometric model of random
labelings with the observed marginals ``a`` (row sums, ``R`` of them) and ``b`` (column sums, ``C``)::

    EMI = Σ_i Σ_j Σ_{n = max(1, a_i + b_j − N)}^{min(a_i, b_j)}
              n/N · log(N·n / (a_i·b_j)) · a_i! b_j! (N − a_i)! (N − b_j)!
                                           / (N! n! (a_i − n)! (b_j − n)! (N − a_i − b_j + n)!)

The summand of a cell depends on ``(a_i, b_j)`` only, not on which row and column they are. So the
sum runs over the *distinct* values of ``a`` and ``b``, each pair weighted by how many rows and
columns carry them. There are at most ``√(2N)`` distinct marginals on each side (they sum to N),
so at most ``2N`` distinct pairs, however many clusters there are: SOP's 11,316 classes of 2–12
images have 11 distinct class sizes. The ``n`` terms of all pairs are laid out flat (a ragged
``arange``) and evaluated in numpy in blocks of at most :data:`_BLOCK` terms, with ``log k!`` read
from one table of ``N + 1`` entries. No Python loop runs over cells or over ``n``.

torchmetrics' ``adjusted_mutual_info_score`` loops in Python over the cells, orders of magnitude
slower than this (docs/metrics.md has the figures), so headreg does not call it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["contingency_marginals", "mutual_info", "expected_mutual_info", "nmi_ami"]

#: Terms of the EMI sum evaluated at once (about 10 float64 temporaries of this length: ~80 MiB).
_BLOCK = 1 << 20

_AVERAGES = ("arithmetic", "geometric", "min", "max")


def contingency_marginals(
    labels_true: np.ndarray, labels_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero cells of the contingency table and its marginals, without building the table.

    Args:
        labels_true: ``(N,)`` integer labels.
        labels_pred: ``(N,)`` integer labels.

    Returns:
        ``(cells, a, b)``: int64 counts of the non-zero cells, row sums ``a`` (``(R,)``, one per
        distinct true label) and column sums ``b`` (``(C,)``, one per distinct predicted label).
    """
    _, rows = np.unique(labels_true, return_inverse=True)
    _, cols = np.unique(labels_pred, return_inverse=True)
    rows, cols = rows.ravel().astype(np.int64), cols.ravel().astype(np.int64)
    n_cols = int(cols.max()) + 1 if cols.size else 0
    _, cells = np.unique(rows * n_cols + cols, return_counts=True)
    return cells.astype(np.int64), np.bincount(rows).astype(np.int64), np.bincount(cols).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a labeling from its class counts (scikit-learn's ``_entropy``)."""
    if counts.size <= 1:
        return 0.0
    p = counts.astype(np.float64)
    total = p.sum()
    return float(-np.sum((p / total) * (np.log(p) - math.log(total))))


def mutual_info(cells: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information (nats) from the non-zero cells and the marginals; 0 when either side has one label.

    Written as ``Σ n_ij/N · log(N·n_ij / (a_i·b_j))`` needs ``a_i·b_j`` per cell; the sum is
    rearranged as ``Σ n_ij/N·log n_ij − H-like terms`` so only the cells and the marginals appear.
    """
    if a.size <= 1 or b.size <= 1:
        return 0.0
    n = float(a.sum())
    c = cells.astype(np.float64)
    af, bf = a.astype(np.float64), b.astype(np.float64)
    # Σ_ij n_ij log(n_ij N / (a_i b_j)) = Σ n_ij log n_ij + N log N − Σ a_i log a_i − Σ b_j log b_j
    total = np.sum(c * np.log(c)) + n * math.log(n) - np.sum(af * np.log(af)) - np.sum(bf * np.log(bf))
    return max(float(total / n), 0.0)


def expected_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """Expected mutual information (nats) of random labelings with marginals ``a`` and ``b``.

    Args:
        a: ``(R,)`` int64 row sums (cluster sizes of one labeling), all positive.
        b: ``(C,)`` int64 column sums of the other, with ``b.sum() == a.sum()``.

    Returns:
        EMI in float64; 0 when either labeling has a single label.
    """
    if a.size <= 1 or b.size <= 1:
        return 0.0
    n = int(a.sum())
    ua, wa = np.unique(a, return_counts=True)
    ub, wb = np.unique(b, return_counts=True)
    # Every (distinct a, distinct b) pair, weighted by how many cells carry it.
    pa = np.repeat(ua, ub.size)
    pb = np.tile(ub, ua.size)
    weight = np.repeat(wa, ub.size).astype(np.float64) * np.tile(wb, ua.size)
    start = np.maximum(1, pa + pb - n)
    length = np.minimum(pa, pb) - start + 1  # ≥ 1, since min(a, b) ≥ max(1, a + b − N)
    log_fact = _log_factorials(n)
    log_n = math.log(n)
    total = 0.0
    ends = np.cumsum(length)
    lo = 0
    while lo < pa.size:
        # The largest run of pairs whose terms fit one block (at least one pair).
        hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + _BLOCK, side="right")))
        total += _emi_block(pa[lo:hi], pb[lo:hi], start[lo:hi], length[lo:hi], weight[lo:hi], n, log_n, log_fact)
        lo = hi
    return total


def _log_factorials(n: int) -> np.ndarray:
    """``log k!`` for ``k = 0 … n`` in float64 (gammaln is exact to about an ulp at every k)."""
    from scipy.special import gammaln

    return gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)


def _emi_block(
    pa: np.ndarray,
    pb: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    weight: np.ndarray,
    n: int,
    log_n: float,
    log_fact: np.ndarray,
) -> float:
    """The EMI terms of a run of (a, b) pairs: all their ``n_ij`` values laid out flat."""
    total = int(length.sum())
    pair = np.repeat(np.arange(pa.size), length)
    # nij = start of its pair + its offset within the pair
    offset = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
    nij = start[pair] + offset
    a, b = pa[pair], pb[pair]
    log_term3 = (
        log_fact[a]
        + log_fact[b]
        + log_fact[n - a]
        + log_fact[n - b]
        - log_fact[n]
        - log_fact[nij]
        - log_fact[a - nij]
        - log_fact[b - nij]
        - log_fact[n - a - b + nij]
    )
    nf = nij.astype(np.float64)
    term = (nf / n) * (log_n + np.log(nf) - np.log(a.astype(np.float64)) - np.log(b.astype(np.float64)))
    return float(np.dot(weight[pair], term * np.exp(log_term3)))


def _average(u: float, v: float, method: str) -> float:
    if method == "arithmetic":
        return (u + v) / 2.0
    if method == "geometric":
        return math.sqrt(u * v)
    if method == "min":
        return min(u, v)
    return max(u, v)


def nmi_ami(
    labels_true: np.ndarray, labels_pred: np.ndarray, average_method: str = "arithmetic"
) -> tuple[float, float]:
    """Normalised and adjusted mutual information of two labelings.

    Args:
        labels_true: ``(N,)`` integer labels.
        labels_pred: ``(N,)`` integer labels (cluster ids).
        average_method: how the two entropies are averaged in the normaliser: ``"arithmetic"``
            (scikit-learn's default), ``"geometric"``, ``"min"`` or ``"max"``.

    Returns:
        ``(nmi, ami)``, with scikit-learn's limit cases: both labelings a single label (or empty)
        gives ``(1.0, 1.0)``; one side a single label gives NMI 0 and AMI 0.
    """
    if average_method not in _AVERAGES:
        raise ValueError(f"average_method must be one of {', '.join(_AVERAGES)}, got {average_method!r}")
    cells, a, b = contingency_marginals(np.asarray(labels_true), np.asarray(labels_pred))
    if a.size == b.size and a.size <= 1:
        return 1.0, 1.0
    mi = mutual_info(cells, a, b)
    h = _average(_entropy(a), _entropy(b), average_method)
    nmi = 0.0 if mi == 0.0 else mi / h
    if a.size == 1 or b.size == 1:
        return nmi, 0.0
    emi = expected_mutual_info(a, b)
    # As scikit-learn: keep the signs of numerator and denominator but never let them reach 0,
    # so a perfect match (h == emi up to rounding) is 1 rather than 0/0.
    eps = np.finfo(np.float64).eps
    den, num = h - emi, mi - emi
    den = min(den, -eps) if den < 0 else max(den, eps)
    num = min(num, -eps) if num < 0 else max(num, eps)
    return float(nmi), float(num / den)
