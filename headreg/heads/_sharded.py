"""A class-sharded head (Partial FC): each rank holds a contiguous block of the classes' rows.

An, Zhu et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021, and Partial
FC v2 in insightface's ``arcface_torch``. Every rank all-gathers the embeddings and the labels of the global
batch and feeds the head's :meth:`~headreg.heads.Head.fused_terms` with its own block of class rows to
:func:`~headreg.heads.functional.fused_margin_cross_entropy` (``class_offset``, ``group``): the softmax
cross-entropy over all ``C`` classes from ``(B,)`` all-reduces of the row maximum, the target logit and the
sum of exponentials. No rank ever holds a ``(B, C)`` matrix, a ``(C, D)`` weight or its gradient.

With ``sample_rate = r < 1`` each rank keeps, per step, the classes of its block present in the global batch
plus uniformly drawn others up to ``⌈r · C_local⌉`` (drawn from torch's generator, so seeded by the run's
seed and saved with its state), and the softmax runs over the kept classes only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidValueError
from ._fused import fused_margin_cross_entropy
from .base import HeadOutput, check_embeddings, check_labels, check_number, float32_region

__all__ = ["ShardedHead", "head_shard_refusal", "shard_bounds"]


def _group_size() -> int:
    """Processes in the default group; 1 when none is initialised (a sharded head then holds every class)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: Tensor, op: Any = None) -> Tensor:
    """In-place all-reduce (sum by default) over the group; nothing to do in a world of one."""
    if _group_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


def _all_gather(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order."""
    if _group_size() == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: contiguous blocks, the first ``C mod W`` ranks one row longer."""
    base, extra = divmod(num_classes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward.

    Every rank computes the same loss from the sum, so the gradient of that loss with respect to this rank's
    addend is the gradient with respect to the sum, which each rank already holds: nothing to exchange.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return _all_reduce(t.clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient: for a scalar every rank holds (a learned
    scale), whose gradient each rank computes over its own classes only."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _all_reduce(grad.contiguous().clone())


class _GatherRows(torch.autograd.Function):
    """All-gather of ``(n_r, D)`` blocks in rank order (sizes may differ); backward returns this rank's rows.

    Each rank's loss term depends on every rank's rows, so the gradient of the (replicated) loss with
    respect to this rank's rows is the sum over ranks of their gradients for those rows: one all-reduce of
    the ``(B, D)`` gradient. It is then multiplied by ``W``, because DDP averages the backbone's gradients
    over the ranks while the loss is already the mean over the global batch (insightface's ``AllGather``
    does the same).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = _all_reduce(grad.contiguous())
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo : lo + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's rows of ``x`` in rank order; each pads to the largest count for one ``all_gather``."""
    if len(sizes) == 1:
        return x
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = _all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class ShardedHead(nn.Module):
    """A registered head over this rank's block of classes, with the loss over all of them.

    Build it with :func:`headreg.create_model` (``shard_head=True``) under an initialised process group.
    ``inner`` is the head itself built for ``hi − lo`` classes (rows ``[lo, hi)`` of the logical head).

    Args:
        build: ``n ↦`` the head built for ``n`` classes (its options bound); it must be ``shardable``
            (:func:`head_shard_refusal`).
        name: its registry name, for messages.
        in_features: embedding width ``D``.
        num_classes: all classes ``C``, at least the world size.
        sample_rate: ``r`` in ``(0, 1]``, the fraction of each rank's classes kept per step.
    """

    def __init__(
        self,
        build: Callable[[int], nn.Module],
        name: str,
        in_features: int,
        num_classes: int,
        *,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        self.world_size = _group_size()
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        if num_classes < self.world_size:
            raise InvalidValueError(
                f"shard_head=True splits num_classes={num_classes} over {self.world_size} processes; "
                "every process needs at least one class"
            )
        self.sample_rate = check_number("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        self.lo, self.hi = shard_bounds(num_classes, self.world_size, self.rank)
        self.inner = _rows_of(build, num_classes, in_features, self.lo, self.hi)
        why = head_shard_refusal(self.inner)
        if not why:
            why = _unsharded_state(self.inner, self.hi - self.lo)
        terms = getattr(self.inner, "shard_terms", getattr(self.inner, "fused_terms", None))
        if not why and not (callable(terms) and isinstance(getattr(self.inner, "weight", None), Tensor)):
            why = "it declares shardable but lacks fused_terms(x) or a per-class weight (docs/plugins.md)"
        if why:
            raise InvalidValueError(f"head {name!r} cannot be class-sharded (shard_head=True): {why}")
        self.name, self.in_features, self.num_classes = name, in_features, num_classes
        self.kept: Tensor | None = None  # this rank's classes kept by the last training step (None: all)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> HeadOutput | Tensor:
        """Training loss over all classes (with labels); the full ``(B, C)`` margin-free logits (without).

        Collective: every rank must call it with its part of the same global batch.
        """
        sizes = self._check(embeddings, labels)
        x = _GatherRows.apply(embeddings, sizes, self.rank)
        if labels is None:  # small C only: (B, C) per rank; label_rank avoids it
            with torch.no_grad(), float32_region(x) as dtype:
                local = self.inner(x.to(dtype))
            mine = _gather_padded(local.t().contiguous(), self.class_counts()).t()
            lo = sum(sizes[: self.rank])
            return mine[lo : lo + sizes[self.rank]]
        y = _gather_padded(labels.to(torch.int64), sizes)
        with float32_region(x) as dtype:
            x = x.to(dtype)
            cls = y - self.lo
            cls = torch.where((cls >= 0) & (cls < self.hi - self.lo), cls, torch.full_like(cls, -1))
            rows = self._sample(cls)
            hook = getattr(self.inner, "shard_terms", None) or self.inner.fused_terms  # plugin heads: fused_terms
            terms = hook(x)
            bias = getattr(self.inner, "bias", None) if not terms.normalize_weight else None
            scale = terms.scale
            if isinstance(scale, Tensor) and scale.dim() == 0 and scale.requires_grad:
                scale = _SumGradOverRanks.apply(scale)  # learned: every rank's classes add to its gradient
            res = fused_margin_cross_entropy(
                terms.embeddings, self.inner.weight.to(dtype), y, terms.margin_target, scale,
                bias=None if bias is None else bias.to(dtype), normalize_weight=terms.normalize_weight,
                class_offset=self.lo, index=rows, group=dist.group.WORLD if self.world_size > 1 else None,
            )  # fmt: skip
            loss = res.loss
            extra = getattr(self.inner, "partial_penalty", None)  # a term beyond the cross-entropy (centres)
            penalty = extra(x, cls, sharded=True) if callable(extra) else None
            if penalty is not None:
                loss = loss + _SumOverRanks.apply(penalty) / x.shape[0]
        lo = sum(sizes[: self.rank])
        # top1 over the kept classes only when sampling: then the loop ranks with label_rank instead.
        top1 = res.top1[lo : lo + sizes[self.rank]] if rows is None else None
        return HeadOutput(loss=loss, top1=top1)

    @property
    def warmup_attributes(self) -> tuple[str, ...]:
        """The wrapped head's (``headreg train --head-warmup``): read and set through the wrapper."""
        return tuple(getattr(self.__dict__.get("_modules", {}).get("inner"), "warmup_attributes", ()))

    def __getattr__(self, name: str) -> Any:
        if name in self.warmup_attributes:
            return getattr(self.__dict__["_modules"]["inner"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.warmup_attributes:
            setattr(self.__dict__["_modules"]["inner"], name, value)  # every rank ramps its block's copy alike
        else:
            super().__setattr__(name, value)

    def class_counts(self) -> list[int]:
        """Classes held by each rank, in rank order."""
        return [
            hi - lo for lo, hi in (shard_bounds(self.num_classes, self.world_size, r) for r in range(self.world_size))
        ]

    @torch.no_grad()
    def label_rank(self, embeddings: Tensor, labels: Tensor, block: int = 1024) -> Tensor:
        """:func:`headreg.metrics.classification.label_rank` under the full head, from the shards.

        Collective: the ranks agree on the number of blocks, so their row counts may differ. Per block,
        the target logit and the count of classes above it are all-reduced; a label outside ``[0, C)``
        gets rank ``C``.
        """
        n = torch.tensor([embeddings.shape[0]], dtype=torch.int64, device=embeddings.device)
        _all_reduce(n, dist.ReduceOp.MAX)
        out = []
        for s in range(0, max(int(n), 1), block):
            e, y = embeddings[s : s + block], labels[s : s + block].to(torch.int64)
            sizes = self._sizes(e.shape[0], e.device)
            x = _gather_padded(e, sizes)
            yy = _gather_padded(y, sizes)
            with float32_region(x) as dtype:
                logits = self.inner(x.to(dtype))
            cls = yy - self.lo
            here = (cls >= 0) & (cls < self.hi - self.lo)
            target = logits.gather(1, cls.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
            target = torch.where(here, target, torch.zeros_like(target))
            _all_reduce(target)
            above = _all_reduce((logits > target.unsqueeze(1)).sum(1))
            valid = (yy >= 0) & (yy < self.num_classes)
            ranks = torch.where(valid, above, torch.full_like(above, self.num_classes))
            lo = sum(sizes[: self.rank])
            out.append(ranks[lo : lo + sizes[self.rank]])
        return torch.cat(out) if out else labels.new_zeros(0, dtype=torch.int64)

    def _sizes(self, n: int, device: torch.device) -> list[int]:
        return [int(p) for p in _all_gather(torch.tensor([n], dtype=torch.int64, device=device))]

    def _check(self, embeddings: Tensor, labels: Tensor | None) -> list[int]:
        """Check this rank's inputs, then learn every rank's verdict and batch size in one collective.

        A bad input on any rank is an error on every rank (naming the rank), so none waits in a later
        collective for a rank that has already raised.
        """
        problem = ""
        try:
            check_embeddings(embeddings, self.in_features)
            if labels is not None:
                check_labels(labels, embeddings.shape[0], self.num_classes)
        except InvalidInputError as exc:
            problem = str(exc)
        device = embeddings.device if isinstance(embeddings, Tensor) else torch.device("cpu")
        rows = embeddings.shape[0] if isinstance(embeddings, Tensor) and embeddings.dim() == 2 else 0
        mine = torch.tensor([1 if problem else 0, rows], dtype=torch.int64, device=device)
        parts = _all_gather(mine)
        bad = [r for r, p in enumerate(parts) if int(p[0])]
        if bad:
            if problem:
                raise InvalidInputError(f"{problem} (on rank {self.rank} of the sharded head {self.name!r})")
            raise InvalidInputError(f"rank {bad[0]} was given an invalid batch for the sharded head {self.name!r}")
        return [int(p[1]) for p in parts]

    def _sample(self, cls: Tensor) -> Tensor | None:
        """This step's kept classes of the block, sorted (None: all); ``cls`` is each row's, ``-1`` if not here."""
        n_local = self.hi - self.lo
        if self.sample_rate >= 1.0 or not self.training:
            self.kept = None
            return None
        positive = torch.unique(cls[cls >= 0])
        keep = max(math.ceil(self.sample_rate * n_local), 1)
        if keep > positive.numel():
            score = torch.rand(n_local, device=cls.device)
            score[positive] = 2.0  # every class of the batch is kept
            rows = torch.topk(score, keep).indices.sort().values
        else:
            rows = positive
        self.kept = rows
        return rows

    def extra_repr(self) -> str:
        return (
            f"{self.name}, classes [{self.lo}, {self.hi}) of {self.num_classes} on rank {self.rank} of "
            f"{self.world_size}, sample_rate={self.sample_rate:g}"
        )


#: Above this many weight elements (``C · D``; 1 GiB of float32) a rank builds its own block only, under
#: its own seed, instead of the whole head: the initial weights then differ from one process's.
EXACT_INIT_MAX = 1 << 28


def _rows_of(build: Callable[[int], nn.Module], num_classes: int, in_features: int, lo: int, hi: int) -> nn.Module:
    """The head for classes ``[lo, hi)`` with the rows the unsharded head would have been initialised with.

    Up to :data:`EXACT_INIT_MAX` weight elements, the whole head is built once, on the host, drawing exactly
    what the unsharded head draws (so the run's random streams and the initial weights match one process's),
    and this rank keeps its rows; the block's own head is built under a forked generator. That ``(C, D)``
    initialisation is transient. Above it, memory wins: the block is drawn under a seed of the run's seed
    and ``lo``, so each rank's rows differ and a rerun draws the same ones.
    """
    if num_classes * in_features > EXACT_INIT_MAX:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() * 1_000_003 + lo) % (1 << 63))
            return build(hi - lo)
    whole = build(num_classes)
    with torch.random.fork_rng(devices=[]):
        head = build(hi - lo)
    mine, theirs = head.state_dict(), whole.state_dict()
    with torch.no_grad():
        for key, t in mine.items():
            if t.ndim:
                per = theirs[key].shape[0] // num_classes
                t.copy_(theirs[key][lo * per : hi * per])
            else:
                t.copy_(theirs[key])
    return head


def _unsharded_state(head: nn.Module, n_local: int) -> str:
    """Why a head's parameters or buffers cannot be split by class ("" when all can, see ``shardable``)."""
    for kind, named in (("parameter", head.named_parameters()), ("buffer", head.named_buffers())):
        for pname, t in named:
            if t.ndim == 0:
                continue  # a step counter every rank advances alike; a learned scale, its gradient summed
            if t.shape[0] % n_local:
                return (
                    f"its {kind} {pname!r} of shape {tuple(t.shape)} is not per class, so no rank alone "
                    "could compute its gradient or update"
                )
    return ""


#: Why a head that says nothing about sharding is not sharded.
NOT_SHARDABLE = "it does not declare itself shardable (shardable = True with fused_terms; docs/scale.md)"


def head_shard_refusal(head: nn.Module) -> str:
    """Why ``head`` cannot be class-sharded, ``""`` when it can: its class's ``shardable``, then its options.

    Built-in and plugin heads alike: ``shardable = True`` on the class, and optionally a ``shard_refusal()``
    method giving the reason (an option that breaks it; or, on a head that is not shardable, why not).
    """
    refusal = getattr(head, "shard_refusal", None)
    why = str(refusal()) if callable(refusal) else ""
    return why if getattr(type(head), "shardable", False) else why or NOT_SHARDABLE
