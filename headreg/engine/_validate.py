"""Validation during training: ``--val`` sets through ``headreg eval``'s code path, the best model, early stop.

Each validation set (:mod:`headreg.engine._valspec` parses ``--val``) is read once, when the run is set up, so a
missing file stops the run before its first step. At each validation every set goes through
:func:`headreg.engine.evaluate.evaluate_model`, the function behind ``headreg eval``: under ``torchrun`` each rank
extracts its shard, rank 0 computes the metrics and every rank receives them, so all ranks take the same decision.
A retrieval set is evaluated leave-one-out (or query/gallery) with the run's ``eval_metrics`` families; a pairs set
(``lfw.bin``, ``bin:``, ``lfw:``, ``pairs:``) by the pairs protocol with the flip test-time augmentation, as
``headreg eval --dataset bin:PATH`` does by default. So ``headreg eval --checkpoint RUN/best`` on the same set
reports the numbers of the validation that kept it.

The validation's progress (the best value, when and where it was reached, how many validations since, whether
the run ended early) is part of the resumable state.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DatasetNotFoundError, InvalidValueError
from ._config import TrainConfig
from ._distributed import Ranks
from ._epochlog import EpochLog
from ._jsonsafe import json_safe
from ._rundir import RunDir
from ._shard_head import is_sharded
from ._valspec import ValProtocol, higher_is_better, parse_every, parse_protocols, split_best

__all__ = ["Validator"]

#: The metrics a validation line on stderr shows per set (all of them go to metrics.jsonl).
_SHOWN = ("kfold_accuracy", "precision_at_1", "mean_average_precision_at_r", "top1_accuracy")


class Validator:
    """The ``--val`` sets of a run, when they are due, and what their results decide.

    Args:
        config: the run's config (``val``, ``val_every``, ``keep_best``, ``early_stop``, ``eval_metrics``,
            ``amp``, ``data_dir``).
        run_dir: where ``best/`` is written (rank 0).
        log: the run's :class:`~headreg.engine._epochlog.EpochLog` (``metrics.jsonl`` and stderr).
        device: where the model runs.
        batch_size: images per batch per process.
        main: this is rank 0 (the only one that writes).
    """

    def __init__(
        self, config: TrainConfig, run_dir: RunDir, log: EpochLog, *, device: torch.device, batch_size: int, main: bool
    ) -> None:
        self.protocols = parse_protocols(config.val)
        self.every, self.unit = parse_every(config.val_every)
        self.watch: tuple[str, str] | None = None
        if config.keep_best is not None:
            self.watch = split_best(config.keep_best, [p.key for p in self.protocols])
        self.patience = config.early_stop
        self.metrics = tuple(config.eval_metrics) or ("retrieval",)
        self.amp = config.amp
        self.input_size = config.input_size
        self.run_dir, self.log, self.device, self.batch_size, self.main = run_dir, log, device, batch_size, main
        self.sets = [_load(p, config.data_dir) for p in self.protocols]
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.bad = 0  # validations since the best one
        self.last_step: int | None = None
        self.ended: str | None = None  # why --early-stop ended the run
        self.summary = ""  # the short form shown in the progress bar
        self.warned: set[tuple[str, str]] = set()

    @classmethod
    def build(cls, config: TrainConfig, run_dir: RunDir, log: EpochLog, ranks: Ranks) -> Validator | None:
        """The run's validator, on the test pass's device and batch; None without ``--val``."""
        if not config.val:
            return None
        batch = max(256, config.batch_size // ranks.info.world_size)
        return cls(config, run_dir, log, device=ranks.device, batch_size=batch, main=ranks.main)

    # ------------------------------------------------------------------------------------------ when
    def due_after_step(self, step: int) -> bool:
        """Whether a step-counted validation falls on global step ``step``."""
        return self.unit == "step" and step % self.every == 0 and step != self.last_step

    def due_at_epoch_end(self, epochs_done: int, step: int, *, last: bool) -> bool:
        """Whether an epoch end (``epochs_done`` finished, at ``step``) validates; the run's last step always does."""
        if step == self.last_step:
            return False
        return last or (self.unit == "epoch" and epochs_done % self.every == 0)

    # ------------------------------------------------------------------------------------------ what
    def run(self, model: nn.Module, epoch: int, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Evaluate every set with ``model`` (every rank), decide on the best model and early stop, log the line.

        Args:
            model: the unwrapped :class:`~headreg.HeadModel`.
            epoch: the 1-based epoch the validation runs in (at its end for epoch-counted validation).
            step: the global step.

        Returns:
            ``(record, results)``: the ``metrics.jsonl`` line and ``{key: EvalResult}``.
        """
        from .evaluate import evaluate_model

        t0 = time.perf_counter()
        results: dict[str, Any] = {}
        for p, (query, gallery) in zip(self.protocols, self.sets, strict=True):
            pairs = getattr(query, "issame", None) is not None
            results[p.key] = res = evaluate_model(
                model, query, gallery, device=self.device, batch_size=self.batch_size, amp=self.amp,
                input_size=self.input_size,
                metrics=None if pairs else self.metrics, progress=self.log.progress and self.main,
            )  # fmt: skip
            if res.info.get("channels_last"):  # back to the layout the optimiser and DDP know (see Run._test_pass)
                model.to(memory_format=torch.contiguous_format)
            for warning in res.warnings:  # what `headreg eval` would warn about, said once per run
                if (p.key, warning) not in self.warned:
                    self.warned.add((p.key, warning))
                    self.log.say(f"warning: --val {p.key}: {warning}")
        values = {k: json_safe(dict(r.metrics)) for k, r in results.items()}
        record: dict[str, Any] = {"epoch": epoch, "step": step, "val": values}
        if self.watch is not None:
            record["best"] = self._judge(model, values, epoch, step)
        if self.ended:
            record["early_stop"] = self.ended
        record["val_time"] = time.perf_counter() - t0
        self.last_step = step
        self.summary = self._summary(values)
        self.log.record_validation(record, self._line(record))
        return record, results

    def _judge(self, model: nn.Module, values: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
        """Compare the watched metric with the best so far; keep ``best/``; count towards early stop."""
        assert self.watch is not None
        key, metric = self.watch
        if metric not in values[key]:
            raise InvalidValueError(
                f"--keep-best {key}/{metric}: the validation set {key!r} reports no {metric!r}; "
                f"it reports {', '.join(sorted(values[key]))}"
            )
        value = values[key][metric]
        better = higher_is_better(metric)
        improved = value is not None and (self.best is None or (value > self.best if better else value < self.best))
        if improved:
            self.best, self.best_epoch, self.best_step, self.bad = float(value), epoch, step, 0
            # Under a sharded head every rank writes its rows (a collective); otherwise rank 0 writes.
            if self.main or is_sharded(model):
                meta = {"epoch": epoch, "step": step, "metric": f"{key}/{metric}", "value": float(value)}
                self.run_dir.save_best(model, meta)
        else:
            self.bad += 1
        if self.patience is not None and self.bad >= self.patience:
            self.ended = (
                f"early stop at epoch {epoch}, step {step}: {key}/{metric} has not improved for {self.bad} "
                f"validation(s) (best {_fmt(self.best)} at step {self.best_step})"
            )
        return {"metric": f"{key}/{metric}", "value": self.best, "epoch": self.best_epoch, "step": self.best_step,
                "improved": improved}  # fmt: skip

    def _summary(self, values: dict[str, Any]) -> str:
        if self.watch is not None:
            key, metric = self.watch
            v = values[key].get(metric)
            return f"{key}/{metric} {_fmt(v)}"
        parts = []
        for key, vals in values.items():
            name = next((m for m in _SHOWN if m in vals), None)
            if name is not None:
                parts.append(f"{key} {name} {_fmt(vals[name])}")
        return ", ".join(parts[:2])

    def _line(self, record: dict[str, Any]) -> str:
        shown = []
        for key, vals in record["val"].items():
            names = [m for m in _SHOWN if m in vals] or list(vals)[:2]
            shown.append(f"{key}: " + " ".join(f"{m} {_fmt(vals[m])}" for m in names))
        line = f"validation at epoch {record['epoch']}, step {record['step']}: " + "; ".join(shown)
        best = record.get("best")
        if best is not None:
            saved = "; best/ updated" if best["improved"] else f"; {self.bad} without improvement"
            line += f" (best {best['metric']} {_fmt(best['value'])} at step {best['step']}{saved})"
        return line

    # ------------------------------------------------------------------------------------------ resume
    def state(self) -> dict[str, Any]:
        """The validation's part of the resumable state (schema: ``headreg._schema``)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step, "bad": self.bad,
                "last_step": self.last_step, "ended": self.ended}  # fmt: skip

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take over a resumed run's validation progress (none in a state saved without ``--val``)."""
        if not state:
            return
        self.best, self.best_epoch, self.best_step = state.get("best"), state.get("best_epoch"), state.get("best_step")
        self.bad, self.last_step, self.ended = int(state.get("bad", 0)), state.get("last_step"), state.get("ended")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _load(p: ValProtocol, data_dir: str | None) -> tuple[Any, Any]:
    """Read a validation set now: ``(query, gallery or None)``; a missing file is an error before training."""
    from ..data import create_dataset

    if p.bin_path is None:
        assert p.dataset is not None
        query = create_dataset(p.dataset, p.split, data_dir=data_dir)
        gallery = create_dataset(p.dataset, p.gallery_split, data_dir=data_dir) if p.gallery_split else None
        return query, gallery
    return create_dataset(f"bin:{_find_bin(p.bin_path, data_dir)}", "test"), None


def _find_bin(text: str, data_dir: str | None) -> Path:
    """A bare ``--val NAME.bin``: as given when absolute, else in the data directory, else in the current one."""
    from ..data import resolve_data_dir

    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    places = [resolve_data_dir(data_dir) / path, Path.cwd() / path]
    for place in places:
        if place.is_file():
            return place
    raise DatasetNotFoundError(
        f"--val {text}: no such file in the data directory or the current one (looked for {places[0]} and "
        f"{places[1]}); pass --data-dir, or give the path"
    )
