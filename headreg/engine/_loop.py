"""The step loop of training: one epoch of steps, its running tallies, and stopping cleanly.

Kept free of file I/O, configuration and evaluation: :mod:`headreg.engine._setup` builds the
:class:`StepContext`, :mod:`headreg.engine._runner` decides when to evaluate and what to save;
this module only runs steps and counts.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HeadregError
from ..metrics.classification import label_rank
from ._guard import StepGuard
from ._optim import lr_factor, set_lr, warmup_value
from .runtime import autocast

__all__ = ["EpochTally", "StepContext", "StopFlag", "check_finite", "run_epoch"]


class StopFlag:
    """Set by the first Ctrl-C (SIGINT) or a step budget; the loop stops after the step in flight.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once, as usual. Under ``torch.distributed``
    the flag is combined across ranks each step, so all ranks stop after the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = self.reason or reason

    @contextlib.contextmanager
    def catch_sigint(self) -> Iterator[None]:
        """Turn the first SIGINT (or SIGTERM, a scheduler's stop) into a stop request while the block runs.

        Main thread only. SIGTERM is caught too so that a job killed politely (``kill``, a cluster's time
        limit) saves a resumable state where it stands, as Ctrl-C does.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.request("interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def synced(self, distributed: bool, device: torch.device) -> bool:
        """Whether any rank asked to stop (one all-reduce under distributed)."""
        if not distributed:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.request("stopped on another rank")
        return self.requested


@dataclass
class EpochTally:
    """Running sums of one epoch on this rank; tensors so the hot loop never waits for the device.

    Attributes:
        loss_sum: Σ batch loss × batch size.
        correct: training samples whose label ranks first under the head's margin-free logits
            (:func:`~headreg.metrics.classification.label_rank`, ties counting as hits, as at test time):
            the step's own forward pass when the head reports ``HeadOutput.top1`` (the fused heads),
            else the head called again on the step's embeddings (before the optimiser step).
        seen: samples processed.
        batches: batches (micro-batches under accumulation) consumed in this epoch (resume skips this many).
        seconds: training time spent in this epoch so far.
        skipped: steps skipped by the non-finite guard in this epoch (their samples are not in the sums).
    """

    loss_sum: Tensor
    correct: Tensor
    seen: Tensor
    batches: int = 0
    seconds: float = 0.0
    skipped: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> EpochTally:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def to_state(self) -> dict[str, Any]:
        return {
            "loss_sum": float(self.loss_sum),
            "correct": float(self.correct),
            "seen": float(self.seen),
            "batches": self.batches,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochTally:
        t = cls.zeros(device)
        t.loss_sum.fill_(state["loss_sum"])
        t.correct.fill_(state["correct"])
        t.seen.fill_(state["seen"])
        t.batches, t.seconds = int(state["batches"]), float(state["seconds"])
        t.skipped = int(state.get("skipped", 0))  # states saved before the guard have none
        return t


@dataclass
class StepContext:
    """What one training step needs, built once per run.

    Attributes:
        model: the model to call (DDP-wrapped under distributed).
        head: the unwrapped head, for the training accuracy of the margin-free logits.
        optimizer: the optimiser.
        transform: uint8 batch → model input.
        device: where the batches go.
        base_lr: learning rate before the schedule.
        schedule: schedule name.
        total_steps: steps in the whole run.
        warmup_steps: warm-up steps.
        autocast_dtype: None for float32, else the autocast dtype.
        scaler: a GradScaler for float16, else None.
        distributed: several ranks (the stop flag is synchronised).
        global_step: steps taken so far in the run (advanced here).
        head_warmup: ``{attribute: [start, fraction]}`` of the head, set before every step.
        head_targets: the configured value of each warmed-up attribute (reached at the fraction).
        on_step: called with the global step after each step (tests, custom logging).
        in_step: a step is in flight (a second Ctrl-C then keeps the last saved state).
        accumulate: micro-batches per optimiser step (their gradients summed, each loss divided by it).
        guard: clipping and the non-finite guard (:class:`~headreg.engine._guard.StepGuard`); None takes
            plain steps.
        frozen: a module held in eval mode while it is frozen (the backbone under ``freeze_backbone``);
            re-asserted before every step, as an evaluation in between puts the model back in training mode.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    transform: nn.Module
    device: torch.device
    base_lr: float
    schedule: str
    total_steps: int
    warmup_steps: int
    autocast_dtype: torch.dtype | None
    scaler: Any
    distributed: bool
    global_step: int = 0
    head: nn.Module | None = None
    head_warmup: dict[str, list[float]] = field(default_factory=dict)
    head_targets: dict[str, float] = field(default_factory=dict)
    on_step: Callable[[int], None] | None = None
    in_step: bool = field(default=False)
    accumulate: int = 1
    guard: StepGuard | None = None
    frozen: nn.Module | None = None

    def restore_head(self) -> None:
        """Put every warmed-up head attribute back to its configured value (after the run, or when it stops)."""
        for name, value in self.head_targets.items():
            setattr(self.head, name, value)


def run_epoch(
    ctx: StepContext,
    loader: Any,
    tally: EpochTally,
    stop: StopFlag,
    *,
    stop_at_step: int | None = None,
    bar: Any = None,
) -> bool:
    """Train over ``loader`` from batch ``tally.batches`` on; returns True when the epoch finished.

    Returns False when a stop was requested (Ctrl-C, ``stop_at_step`` reached); the state after the
    last completed step is then consistent and can be saved.
    """
    skip, acc = tally.batches, ctx.accumulate
    usable = (len(loader) // acc) * acc  # micro-batches short of a whole step at the end are dropped
    non_blocking = ctx.device.type == "cuda"
    next_refresh = time.perf_counter() + 0.5
    start = time.perf_counter()
    finished = True
    group: list[tuple[Tensor, Tensor, int]] = []  # this step's (loss × n, correct, n), counted if the step is taken
    for i, (images, labels) in enumerate(loader):
        if i < skip:
            continue
        if i >= usable:
            break
        if i % acc == 0:  # a step begins: stop here, between steps, never inside one
            if stop.synced(ctx.distributed, ctx.device) or (
                stop_at_step is not None and ctx.global_step >= stop_at_step
            ):
                if not stop.requested:
                    stop.request(f"stopped after step {ctx.global_step} as asked")
                finished = False
                break
            ctx.in_step = True
            _begin_step(ctx)
            group = []
        last = i % acc == acc - 1
        images = images.to(ctx.device, non_blocking=non_blocking)
        labels = labels.to(ctx.device, non_blocking=non_blocking)
        x = ctx.transform(images)
        with _maybe_no_sync(ctx.model, not last):
            with autocast(ctx.device, ctx.autocast_dtype):
                out = ctx.model(x, labels)
            loss = out.loss if acc == 1 else out.loss / acc
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        if ctx.guard is not None:
            ctx.guard.observe(x, out)
        n = labels.shape[0]
        with torch.no_grad():
            if out.top1 is not None:  # found by the head in its forward pass (the fused heads): free
                correct = out.top1.sum()
            elif callable(getattr(ctx.head, "label_rank", None)) and out.embeddings is not None:
                correct = (ctx.head.label_rank(out.embeddings.detach(), labels) == 0).sum()  # a sampled sharded head
            else:  # accuracy of the margin-free logits, as at test time; O(B·C·D), no backbone
                logits = ctx.head(out.embeddings.detach()) if out.embeddings is not None else out.logits
                correct = (label_rank(logits, labels) == 0).sum()
        group.append((out.loss.detach().double() * n, correct, n))
        tally.batches += 1
        if bar is not None:
            bar.update(1)
        if not last:
            continue
        taken = _finish_step(ctx)
        if taken:
            for loss_n, correct, n in group:
                tally.loss_sum += loss_n
                tally.correct += correct
                tally.seen += n
        else:
            tally.skipped += 1
        ctx.global_step += 1
        ctx.in_step = False
        if ctx.on_step is not None:
            ctx.on_step(ctx.global_step)
        if bar is not None:
            now = time.perf_counter()
            if now >= next_refresh:  # one device sync per refresh, not per step
                next_refresh = now + 0.5
                seen = float(tally.seen)
                mean = float(tally.loss_sum) / max(seen, 1.0)
                check_finite(mean, ctx.global_step)
                bar.set_postfix(
                    loss=f"{mean:.4f}",
                    acc=f"{float(tally.correct) / max(seen, 1.0):.3f}",
                    img_s=f"{seen / max(tally.seconds + now - start, 1e-9):.0f}",
                    **({"skipped": tally.skipped} if tally.skipped else {}),
                    refresh=False,
                )
    tally.seconds += time.perf_counter() - start
    return finished


def _begin_step(ctx: StepContext) -> None:
    """Learning rate and head warm-ups for the step about to run; fresh gradients; the guard's snapshot."""
    set_lr(ctx.optimizer, ctx.base_lr * lr_factor(ctx.schedule, ctx.global_step, ctx.total_steps, ctx.warmup_steps))
    for name, (first, fraction) in ctx.head_warmup.items():
        value = warmup_value(first, ctx.head_targets[name], fraction, ctx.global_step, ctx.total_steps)
        setattr(ctx.head, name, value)
    if ctx.frozen is not None and ctx.frozen.training:
        ctx.frozen.eval()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.guard is not None:
        ctx.guard.begin()


def _finish_step(ctx: StepContext) -> bool:
    """The optimiser step on the summed gradients, through the guard when there is one; True when taken."""
    if ctx.guard is not None:
        return ctx.guard.step(ctx.optimizer, ctx.scaler, ctx.global_step + 1)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    return True


def _maybe_no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for the micro-batches before a step's last: their gradients are reduced once, with it."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if skip_sync and callable(no_sync) else contextlib.nullcontext()


def check_finite(loss: float, step: int) -> None:
    """Raise a HeadregError when the running loss is NaN or infinite."""
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise HeadregError(
            f"the training loss became {loss} by step {step}; lower --lr, use --no-amp, or a smaller scale/margin"
        )
