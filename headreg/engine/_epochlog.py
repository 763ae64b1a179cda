"""Epoch logging of a training run: the progress bar, the per-epoch record and the lines on stderr.

The record of each finished epoch goes to three places at once: the run's history (returned in
:class:`~headreg.engine.train.TrainResult`), ``metrics.jsonl`` (rank 0, through
:class:`~headreg.engine._rundir.RunDir`) and one line on stderr (rank 0).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ._loop import check_finite
from ._rundir import RunDir

__all__ = ["EpochLog"]


def _stderr(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # above the bar, not through it


class EpochLog:
    """The epochs a run has finished, and how it shows them.

    Args:
        run_dir: where ``metrics.jsonl`` lives.
        epochs: the run's epoch count (for "epoch 3/10").
        main: this is rank 0 (the only one that writes and prints).
        progress: show a tqdm bar per epoch.
        log: where lines go instead of stderr.
    """

    def __init__(
        self, run_dir: RunDir, epochs: int, *, main: bool, progress: bool, log: Callable[[str], None] | None
    ) -> None:
        self.run_dir = run_dir
        self.epochs = epochs
        self.main = main
        self.progress = progress
        self.write = log or _stderr
        self.history: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []  # the --val lines (headreg.engine._validate)

    def say(self, msg: str) -> None:
        """One line to the user, from rank 0."""
        if self.main:
            self.write(msg)

    def bar(self, epoch: int, total: int, done: int, note: str = "") -> Any:
        """The progress bar of epoch ``epoch`` (0-based) of ``total`` steps, ``done`` of them already taken.

        ``note`` (the last validation, in short) follows the epoch in the bar's description.
        """
        from tqdm import tqdm

        return tqdm(
            total=total, initial=done, desc=self.describe(epoch, note), unit="batch",
            disable=not (self.progress and self.main), leave=False, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip

    def describe(self, epoch: int, note: str = "") -> str:
        """The bar's description: ``epoch 3/10``, with the last validation's ``note`` after it."""
        return f"epoch {epoch + 1}/{self.epochs}" + (f" [{note}]" if note else "")

    def resume_at(self, epoch: int, step: int = 0) -> None:
        """Take over the history of a resumed run up to ``epoch`` finished epochs and global step ``step``.

        Lines of later epochs, and validations after ``step`` (stopped between writing the line and the
        checkpoint), are dropped from ``metrics.jsonl`` too: they will be run again.
        """
        kept = [h for h in self.run_dir.read_metrics() if (h["step"] <= step if "val" in h else h["epoch"] <= epoch)]
        self.history = [h for h in kept if "val" not in h]
        self.validations = [h for h in kept if "val" in h]
        if self.main:
            self.run_dir.rewrite_metrics(kept)

    def record(
        self,
        epoch: int,
        step: int,
        sums: list[float],
        *,
        lr: float,
        step_time: float,
        eval_time: float,
        retrieval: dict[str, Any] | None = None,
        skipped_steps: int = 0,
        loss_scale: float | None = None,
    ) -> dict[str, Any]:
        """Record finished epoch ``epoch`` (0-based) from its sums over all ranks; returns the record.

        Args:
            epoch: the epoch.
            step: global step at its end.
            sums: ``[loss_sum, train_correct, seen, test_correct, test_count]`` over all ranks.
            lr: the learning rate of the last step (of the first parameter group).
            step_time: seconds spent in training steps (the slowest rank's).
            eval_time: seconds of the test evaluation.
            retrieval: the test split's retrieval metrics when its classes are unseen in training: recorded as
                ``test_<metric>`` instead of ``test_accuracy``, which has no meaning there.
            skipped_steps: steps the non-finite guard skipped in the epoch (the same on every rank).
            loss_scale: the float16 GradScaler's scale at the end of the epoch; None (and not recorded) without one.

        Raises:
            HeadregError: the mean loss is NaN or infinite.
        """
        loss_sum, tr_correct, seen, te_correct, te_count = sums
        check_finite(loss_sum / max(seen, 1.0), step)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": loss_sum / max(seen, 1.0),
            "train_accuracy": tr_correct / max(seen, 1.0),
            "test_accuracy": te_correct / max(te_count, 1.0),
            **{f"test_{k}": v for k, v in (retrieval or {}).items() if isinstance(v, float)},
            "lr": lr,
            "time": step_time,
            "eval_time": eval_time,
            "images_per_s": seen / max(step_time, 1e-9),
            "skipped_steps": skipped_steps,
            **({"loss_scale": loss_scale} if loss_scale is not None else {}),
        }
        if retrieval is not None:
            del record["test_accuracy"]
            test = f"test R@1 {retrieval['recall_at_1']:.4f}  MAP@R {retrieval['mean_average_precision_at_r']:.4f}"
        else:
            test = f"test acc {record['test_accuracy']:.4f}"
        self.history.append(record)
        if self.main:
            self.run_dir.append_metrics(record)
        self.say(
            f"epoch {epoch + 1}/{self.epochs}: loss {record['loss']:.4f}  train acc {record['train_accuracy']:.4f}"
            f"  {test}  {step_time:.1f}s  {record['images_per_s']:.0f} img/s"
            + (f"  {skipped_steps} steps skipped (non-finite)" if skipped_steps else "")
        )
        return record

    def record_validation(self, record: dict[str, Any], line: str) -> None:
        """Record one validation: its line in ``metrics.jsonl`` (``val`` marks it) and ``line`` on stderr."""
        self.validations.append(record)
        if self.main:
            self.run_dir.append_metrics(record)
        self.say(line)

    @property
    def train_seconds(self) -> float:
        """Time spent in training steps, summed over the recorded epochs."""
        return sum(h["time"] for h in self.history)
