"""``--tensorboard``: a training run's scalars and embeddings as TensorBoard event files in ``RUN/tensorboard``.

``metrics.jsonl`` stays the record of a run; this is a view of the same numbers where people look. Rank 0
writes, through :class:`torch.utils.tensorboard.SummaryWriter`:

* every step: ``train/lr``, and each head attribute being warmed up (``head/scale``, ``head/margin``);
* every :data:`RUNNING_EVERY` steps: ``train/loss_running`` and ``train/accuracy_running``, the epoch's means so far;
* every epoch: ``train/loss``, ``train/accuracy``, ``test/accuracy`` (or ``test/<metric>`` for a test split of
  unseen classes), ``perf/images_per_s``, ``perf/epoch_seconds``;
* every validation: ``val/<set>/<metric>`` for every metric, and the embeddings of each set with class labels
  (the pairs sets have none): a scatter image (:mod:`headreg.plotting`) when they are 2-D, else the projector
  (``add_embedding``) on a seeded sample of at most :data:`PROJECTOR_SAMPLES` rows.

A resumed run purges the events logged after its committed step, so the curves hold each step once.
``tensorboard`` is the optional extra ``headreg[tensorboard]``; without it ``--tensorboard`` is refused before
training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidValueError

__all__ = ["Board", "PROJECTOR_SAMPLES", "RUNNING_EVERY", "require_tensorboard"]

#: Rows of a validation set sent to the projector at most (a seeded sample beyond this).
PROJECTOR_SAMPLES = 1000
#: Steps between two running-mean points (each reads the epoch's sums from the device once).
RUNNING_EVERY = 20
SUBDIR = "tensorboard"


def require_tensorboard() -> type:
    """``SummaryWriter``, or InvalidValueError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InvalidValueError(
            f"--tensorboard needs the tensorboard package ({exc}); install it with "
            "`pip install 'headreg[tensorboard]'`, or leave --tensorboard out"
        ) from None
    return SummaryWriter


class Board:
    """The run's TensorBoard writer; every method is a no-op when ``--tensorboard`` is off or on ranks > 0.

    Args:
        run_dir: the run directory (events go to ``run_dir/tensorboard``).
        enabled: ``--tensorboard`` and rank 0.
        purge_step: the first step a resumed run takes: events the stopped run logged from it on are dropped.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, purge_step: int | None = None) -> None:
        self.writer: Any = None
        if enabled:
            writer = require_tensorboard()
            self.writer = writer(log_dir=str(Path(run_dir) / SUBDIR), purge_step=purge_step)

    def step(self, step: int, ctx: Any, tally: Any) -> None:
        """After optimiser step ``step``: the learning rate, warmed-up head attributes, running means."""
        w = self.writer
        if w is None:
            return
        w.add_scalar("train/lr", ctx.optimizer.param_groups[0]["lr"], step)
        for name in ctx.head_warmup:
            w.add_scalar(f"head/{name}", float(getattr(ctx.head, name)), step)
        if tally is not None and step % RUNNING_EVERY == 0:
            seen = max(float(tally.seen), 1.0)
            w.add_scalar("train/loss_running", float(tally.loss_sum) / seen, step)
            w.add_scalar("train/accuracy_running", float(tally.correct) / seen, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's ``metrics.jsonl`` record, at its last step."""
        w = self.writer
        if w is None:
            return
        step = record["step"]
        names = {"loss": "train/loss", "train_accuracy": "train/accuracy", "images_per_s": "perf/images_per_s",
                 "time": "perf/epoch_seconds"}  # fmt: skip
        # test_accuracy, or the retrieval metrics of a test split of unseen classes (test_recall_at_1, ...)
        names.update({k: f"test/{k[len('test_') :]}" for k in record if k.startswith("test_")})
        for key, tag in names.items():
            if isinstance(record.get(key), (int, float)):
                w.add_scalar(tag, record[key], step)
        w.flush()

    def validation(self, record: dict[str, Any], results: dict[str, Any]) -> None:
        """A validation's metrics, and the embeddings of each set that has class labels."""
        w = self.writer
        if w is None:
            return
        step = record["step"]
        for key, values in record["val"].items():
            for metric, value in values.items():
                if value is not None:
                    w.add_scalar(f"val/{key}/{metric}", value, step)
        for key, res in results.items():
            if res.issame is None:
                self._embeddings(key, res.embeddings, res.labels, step)
        w.flush()

    def _embeddings(self, key: str, emb: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        if emb.shape[1] <= 2:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            from ..plotting import _draw  # the evaluation checked these embeddings already

            fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
            _draw(ax, emb, labels, f"{key}, step {step}", False, 5000, 0)
            self.writer.add_figure(f"embeddings/{key}", fig, step, close=True)
            return
        if emb.shape[0] > PROJECTOR_SAMPLES:
            keep = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))[:PROJECTOR_SAMPLES]
            emb, labels = emb[keep], labels[keep]
        self.writer.add_embedding(emb.float(), metadata=labels.tolist(), global_step=step, tag=key.replace("/", "_"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
