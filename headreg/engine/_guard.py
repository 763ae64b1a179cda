"""The optimiser step of training, guarded: gradient clipping and a per-step non-finite guard.

A step (one optimiser update, after ``accumulate`` micro-batches) whose input, embeddings, logits, loss or
gradient is NaN or infinite is **skipped**: no optimiser step (so no moment update, no weight decay and no
step count in the optimiser), the model's buffers (batch-norm running statistics, a head's α-rule centres or
step counter) put back as they were before the step, and under float16 the GradScaler backs off as usual.
The learning-rate schedule and head warm-ups are functions of the global step, which counts the batches
consumed, so they move on past a skipped step: a run keeps its planned length and its resume arithmetic.
After ``max_bad_steps`` consecutive skips the run stops with :class:`NonFiniteStop`, naming the first
non-finite tensor of the first skipped step, the step and the AMP loss scale.

Cost: the finiteness of every gradient is one fused reduction (``torch.nn.utils.get_total_norm``, the
``_foreach_norm`` that clipping computes anyway), the forward's tensors add one ``isfinite().all()`` each,
and the verdict is one host synchronisation per step. The parameters are walked one by one only to name
the culprit once a step is known to be bad. ``max_bad_steps=0`` turns the guard off (no synchronisation;
then only the running-loss check of :func:`headreg.engine._loop.check_finite` stops a diverged run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HeadregError
from ..heads._sharded import ShardedHead
from ..heads.base import kept_logits

__all__ = ["NonFiniteStop", "StepGuard"]

#: What each forward flag is called in messages, in the order the forward computes them.
_FLAG_NAMES = ("the input batch", "the embeddings", "the logits", "the loss")


class NonFiniteStop(HeadregError):
    """Training stopped after too many consecutive non-finite steps (the message says which tensor and where)."""

    def resumable_from(self, committed: str | None, run_dir: Path) -> NonFiniteStop:
        """This error, its message ending with the run's last resumable state and how to continue from it."""
        kept = (
            f"The last resumable state ({committed}) is kept"
            if committed
            else "No resumable state was saved yet (`--resume` starts the run over)"
        )
        return NonFiniteStop(
            f"{self}. {kept}: fix the cause (lower --lr, --clip-grad-norm, a smaller head scale or margin, "
            f"--no-amp, or the data) and continue with `headreg train --resume {run_dir}`"
        )


class StepGuard:
    """Clips the gradient and refuses non-finite steps; one per run, shared by every epoch.

    Args:
        model: the unwrapped model (its parameters and buffers).
        max_bad_steps: consecutive skipped steps that stop the run; 0 turns the guard off.
        clip_grad_norm: clip the total gradient 2-norm to this value (after unscaling under float16), or None.
        distributed: combine the verdict over the ranks (one all-reduce per step), so all skip together.
        amp_dtype: the training's autocast dtype (None: float32), for messages.
        log: where the line about a skipped step goes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_bad_steps: int = 10,
        clip_grad_norm: float | None = None,
        distributed: bool = False,
        amp_dtype: torch.dtype | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = max_bad_steps > 0
        self.max_bad_steps = max_bad_steps
        self.clip = clip_grad_norm
        self.distributed = distributed
        self.log = log
        self.precision = "float32" if amp_dtype is None else f"{str(amp_dtype).replace('torch.', '')} autocast"
        self.norm: Tensor | None = None  # this step's total gradient norm
        self.named = list(model.named_parameters())
        # A class-sharded head's rows differ per rank: their squared norms add up over the ranks.
        head = getattr(model, "head", None)
        self.sharded = {id(p) for p in head.inner.parameters() if p.ndim} if isinstance(head, ShardedHead) else set()
        self.buffers = [b for b in model.buffers()]
        self.saved: list[Tensor] = [b.detach().clone() for b in self.buffers] if self.enabled else []
        self.flags: Tensor | None = None  # running AND of the forward flags of this step's micro-batches
        self.streak = 0  # consecutive skipped steps
        self.first = ""  # what went wrong at the first step of the streak

    # -------------------------------------------------------------------------------------- one step
    def begin(self) -> None:
        """Before a step's first forward: remember the buffers the forward will update."""
        self.flags = None
        if self.enabled and self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def observe(self, x: Tensor, out: Any) -> None:
        """After a micro-batch's forward: note, on the device, whether its tensors are finite (no sync)."""
        if not self.enabled:
            return
        parts = [x, out.embeddings, kept_logits(out), out.loss]  # a fused head's unkept logits are not rebuilt
        flags = torch.stack([torch.isfinite(t.detach()).all() if t is not None else _true(x) for t in parts])
        self.flags = flags if self.flags is None else self.flags & flags

    def step(self, optimizer: torch.optim.Optimizer, scaler: Any, step: int) -> bool:
        """Clip, check and take (or skip) the optimiser step whose gradients are in place; True when taken.

        Args:
            optimizer: the optimiser.
            scaler: the float16 GradScaler, or None.
            step: the 1-based number of this step in the run, for messages.

        Raises:
            NonFiniteStop: this skip makes ``max_bad_steps`` in a row.
        """
        if scaler is not None and (self.enabled or self.clip is not None):
            scaler.unscale_(optimizer)  # clip and check the true gradient, not the scaled one
        grads = [p.grad for _, p in self.named if p.grad is not None]
        if not self.enabled:
            if self.clip is not None and grads:
                params = [p for _, p in self.named if p.grad is not None]
                nn.utils.clip_grads_with_norm_(params, self.clip, self._total_norm(), foreach=True)
            _take(optimizer, scaler)
            return True
        norm = self.norm = self._total_norm() if grads or self.sharded else None
        flags = self.flags if self.flags is not None else torch.ones(4, dtype=torch.bool)
        finite = torch.isfinite(norm) if norm is not None else torch.ones((), dtype=torch.bool)
        verdict = torch.cat([flags, finite.reshape(1).to(flags.device)])
        if self.distributed:
            import torch.distributed as dist

            as_float = verdict.float()
            dist.all_reduce(as_float, op=dist.ReduceOp.MIN)
            verdict = as_float > 0
        ok = verdict.tolist()  # the one host synchronisation of the step
        if all(ok):
            self.streak = 0
            if self.clip is not None and norm is not None:
                nn.utils.clip_grads_with_norm_([p for _, p in self.named if p.grad is not None], self.clip, norm)
            _take(optimizer, scaler)
            return True
        self._skip(optimizer, scaler, step, ok)
        return False

    def _total_norm(self) -> Tensor:
        """The 2-norm of every gradient of the model; a sharded head's part summed over the ranks (collective)."""
        grads = [p.grad for _, p in self.named if p.grad is not None and id(p) not in self.sharded]
        norm = nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        if not self.sharded:
            return norm
        import torch.distributed as dist

        rows = [p.grad for _, p in self.named if p.grad is not None and id(p) in self.sharded]
        like = rows[0] if rows else next(p for _, p in self.named if id(p) in self.sharded)
        sq = (nn.utils.get_total_norm(rows, foreach=True) if rows else torch.zeros(())).to(like.device, torch.float32)
        sq = sq.square().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        return (norm.to(sq.device, torch.float32).square() + sq[0]).sqrt()

    def _skip(self, optimizer: torch.optim.Optimizer, scaler: Any, step: int, ok: list[bool]) -> None:
        self.streak += 1
        if self.streak == 1:  # named before the gradients are dropped
            culprit = self._culprit(ok)
            self.first = f"{culprit}, at step {step} ({self._scale(scaler)})"
            if self.log is not None:
                self.log(
                    f"step {step} skipped: non-finite values in {culprit} ({self._scale(scaler)}); weights unchanged"
                )
        if scaler is not None:
            scaler.update()  # backs off when unscale_ found an inf/NaN gradient, as a skipped scaler.step does
        optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)
        if self.streak >= self.max_bad_steps:
            now = f"; the loss scale is now {scaler.get_scale():g}" if scaler is not None else ""
            raise NonFiniteStop(
                f"training stopped: {self.streak} consecutive steps were non-finite, each skipped (steps "
                f"{step - self.streak + 1}-{step}). The first non-finite tensor was {self.first}{now}"
            )

    def _scale(self, scaler: Any) -> str:
        """The AMP loss scale of the step, or why there is none."""
        if scaler is not None:
            return f"{self.precision}, AMP loss scale {scaler.get_scale():g}"
        return f"{self.precision}, no loss scaling"

    def _culprit(self, ok: list[bool]) -> str:
        """The first non-finite tensor, in the order the step computes them; gradients are named by parameter."""
        for name, good in zip(_FLAG_NAMES, ok[: len(_FLAG_NAMES)], strict=True):
            if not good:
                return name
        bad = [n for n, p in self.named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            more = f" (and {len(bad) - 1} more parameters')" if len(bad) > 1 else ""
            return f"the gradient of {bad[0]!r}{more}"
        if self.norm is not None and not bool(torch.isfinite(self.norm)):
            top = max(
                ((float(p.grad.abs().max()), n) for n, p in self.named if p.grad is not None and p.grad.numel()),
                default=(0.0, "?"),
            )
            return f"the total gradient norm (it overflowed: the largest gradient entry is {top[0]:.3g}, in {top[1]!r})"
        return "a gradient on another rank"  # the verdict is combined over the ranks


def _take(optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _true(like: Tensor | None) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=like.device if like is not None else None)
