"""``headreg compare``: train one model per head on the same budget, then draw and tabulate their features.

Every head is trained by :func:`headreg.engine.train.train` with the same backbone, data, seed and
schedule (a :data:`PRESETS` entry), into ``OUT/<head>/``; the comparison then writes
``OUT/compare.png`` (one column per head: the test features, and for the angular heads the same
features normalised onto the unit circle), ``OUT/compare.md`` and ``OUT/compare.json``.

Heads are built with face-recognition defaults (``s = 64``, CosFace ``m = 0.35``...) that do not
fit ten classes in two dimensions: in the plane ten class directions are at most ``2π/10`` apart,
which caps CosFace's margin at ``1 − cos 36° ≈ 0.19`` and ArcFace's at ``0.63`` rad (see
:mod:`headreg.heads._geometry`), and ``s = 64`` saturates the softmax of a 10-class problem
long before the features separate. Each head class's ``settings_2d`` (all of them:
:data:`HEAD_SETTINGS_2D`) holds the settings used with ``--embedding-dim 2`` instead;
``--head-option HEAD:KEY=VALUE`` overrides them, with a warning when the result is infeasible.
Whether a head is drawn on the unit circle too is its class's ``angular``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._atomic import atomic_output, atomic_write_text
from .engine._jsonsafe import json_safe
from .errors import InvalidValueError, UnknownHeadError

if TYPE_CHECKING:
    from torch import Tensor

    from .engine._lock import DirLock

__all__ = [
    "DEFAULT_HEADS",
    "HEAD_SETTINGS_2D",
    "PRESETS",
    "HEAD_AIDS",
    "head_aids",
    "CompareEntry",
    "run_compare",
    "head_settings",
    "plot_compare",
    "compare_table",
]

DEFAULT_HEADS = ("softmax", "modified_softmax", "normface", "sphereface", "arcface", "cosface", "center")


class _Settings2D(Mapping[str, dict[str, Any]]):
    """Each registered head's ``settings_2d``, read from its class on lookup (plugins load lazily)."""

    def __getitem__(self, head: str) -> dict[str, Any]:
        from .heads import head_settings_2d
        from .registry import get_head_class

        try:
            return head_settings_2d(get_head_class(head))
        except UnknownHeadError:
            raise KeyError(head) from None

    def __iter__(self) -> Iterator[str]:
        from .registry import list_heads

        return iter(list_heads())

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: Head options for 2-D features, by head name: a read-only view of each head class's ``settings_2d``.
HEAD_SETTINGS_2D: Mapping[str, dict[str, Any]] = _Settings2D()

#: The optimiser and schedule both presets share (docs/compare.md measures each part): AdamW with a
#: cosine schedule, bf16 autocast.
_RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "optimizer": "adamw",
    "lr": 5e-3,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_epochs": 0.0,
    "amp": True,
    "augment": False,
}

#: Training aids, by the attribute a head can ramp (its ``warmup_attributes``); the caller's settings win.
#:
#: - ``scale``: heads with a fixed logit scale ``s`` (NormFace, ArcFace, CosFace...: ``s · cos θ``, the
#:   feature norm discarded). The class weights and the 2-D layer learn 10x faster, and ``s`` ramps from
#:   1 to its value over the first 70 % of the run: while ``s`` is small the softmax is soft, so classes
#:   that start in the wrong order around the circle can still pass each other.
#: - ``lambda_c``: center loss. λ ramps from 0 over the first half, so that softmax spreads the classes
#:   before the pull towards the centres (which start at the origin) sets in; with λ from the first
#:   step the paper preset's LeNets++ (no batch norm) collapsed its features.
#:
#: Softmax, modified softmax and SphereFace get none: the 10x learning rate under-fits softmax.
#: docs/compare.md measures each aid ("Presets", "--preset paper").
HEAD_AIDS: dict[str, dict[str, Any]] = {
    "scale": {"head_lr_scale": 10.0, "head_warmup": {"scale": [1.0, 0.7]}},
    "lambda_c": {"head_warmup": {"lambda_c": [0.0, 0.5]}},
}


def head_aids(head: Any) -> dict[str, Any]:
    """The :data:`HEAD_AIDS` that apply to a built ``head``: merged over the attributes it can ramp."""
    aids: dict[str, Any] = {}
    for attr in getattr(head, "warmup_attributes", ()):
        for key, value in HEAD_AIDS.get(attr, {}).items():
            aids[key] = {**aids.get(key, {}), **value} if isinstance(value, dict) else value
    return aids


#: Training budgets. ``quick``: minutes on a laptop CPU; ``paper``: LeNets++ as in Wen et al. 2016.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        **_RECIPE,
        "model": "lenetpp_bn",
        # A quarter of LeNets++'s channels; batch norm on the flattened features and no bias in the
        # embedding layer centre the 2-D features on the origin; a 64-wide hidden layer before it.
        "model_options": {"widths": [8, 16, 32], "feature_bn": True, "hidden_dim": 64, "embed_bias": False},
        "epochs": 5,
        "limit": 20000,
        "test_limit": None,
        "eval_limit": 5000,
    },
    "paper": {
        **_RECIPE,
        # LeNets++ as in Wen et al. 2016, with the shared recipe: the paper's SGD (lr 0.01, step decay)
        # trains softmax but not ArcFace (docs/compare.md, "History of the preset").
        "model": "lenetpp",
        "model_options": {},
        "epochs": 10,
        "limit": None,
        "test_limit": None,
        "eval_limit": None,
    },
}

COMPARE_FILES = ("compare.png", "compare.md", "compare.json")


@dataclass
class CompareEntry:
    """One head's outcome.

    Attributes:
        head: head name.
        options: the head options it was trained with.
        test_accuracy: accuracy of the head's margin-free logits on the test set.
        metrics: the final evaluation's metrics (``precision_at_1``, ``mean_average_precision_at_r``, ``nmi``...).
        train_seconds: time spent in training steps.
        total_seconds: wall time of the head's whole run (data, training, evaluation, saving).
        warnings: feasibility warnings for its settings.
        aids: the :data:`HEAD_AIDS` settings it was trained with (empty: none).
        embeddings: ``(N, D)`` test embeddings of the trained model.
        labels: ``(N,)`` their labels.
    """

    head: str
    options: dict[str, Any]
    test_accuracy: float | None
    metrics: dict[str, Any]
    train_seconds: float
    total_seconds: float
    warnings: list[str]
    aids: dict[str, Any] = field(default_factory=dict)
    embeddings: Tensor | None = field(default=None, repr=False)
    labels: Tensor | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "head": self.head,
            "test_accuracy": self.test_accuracy,
            "precision_at_1": m.get("precision_at_1"),
            "mean_average_precision_at_r": m.get("mean_average_precision_at_r"),
            "nmi": m.get("nmi"),
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "options": self.options,
            "aids": self.aids,
        }


def head_settings(head: str, embedding_dim: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options ``head`` is trained with: the 2-D settings when ``embedding_dim == 2``, then ``overrides``."""
    base = dict(HEAD_SETTINGS_2D.get(head, {})) if embedding_dim == 2 else {}
    base.update(overrides or {})
    return base


def _prepare_out(out: Path, overwrite: bool) -> DirLock:
    """Claim ``out`` with the guard of a run directory: never a foreign directory, a comparison only to overwrite.

    Returns its lock, held (one writer per directory); the caller releases it.
    """
    from .engine._lock import DirLock
    from .engine._rundir import OutLayout, claim_out_dir

    def occupied(present: list[Path]) -> str:
        return (
            f"--out {out} already holds a comparison ({', '.join(p.name for p in present[:8])}); "
            "pass --overwrite to replace it or choose a new directory"
        )

    # The head runs in sub-directories are guarded (and overwritten) by their own training runs.
    layout = OutLayout("comparison", frozenset(COMPARE_FILES), run_subdirs=True)
    lock = DirLock(out, "headreg compare")
    claim_out_dir(out, layout, overwrite=overwrite, occupied=occupied, lock=lock)
    return lock


def run_compare(
    heads: list[str],
    dataset: str,
    out: str | Path,
    *,
    embedding_dim: int = 2,
    preset: str = "quick",
    overwrite: bool = False,
    head_options: dict[str, dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log: Any = None,
) -> list[CompareEntry]:
    """Train each head with the same budget and write the figure and the table.

    Args:
        heads: head names (built-in or plugin).
        dataset: dataset name, as for ``headreg train``.
        out: output directory; each head's run goes to ``out/<head>/``.
        embedding_dim: feature width ``D`` (2 to draw the features as they are).
        preset: a :data:`PRESETS` name.
        overwrite: replace a comparison already in ``out``.
        head_options: per-head overrides of :data:`HEAD_SETTINGS_2D`.
        overrides: :class:`~headreg.engine.train.TrainConfig` fields overriding the preset
            (``epochs``, ``limit``, ``device``, ``seed``, ``data_dir``...).
        progress: progress bars and lines.
        log: where lines go (default stderr).

    Returns:
        One :class:`CompareEntry` per head, in order.
    """
    from .engine.train import TrainConfig, margin_feasibility, train
    from .registry import create_head, get_head_entry, head_key

    if preset not in PRESETS:
        raise InvalidValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if not heads:
        raise InvalidValueError("heads must name at least one head, e.g. softmax,arcface")
    heads = [head_key(h) for h in heads]
    dupes = sorted({h for h in heads if heads.count(h) > 1})
    if dupes:
        raise InvalidValueError(f"heads must not repeat, got {', '.join(dupes)} twice")
    for h in heads:
        get_head_entry(h)  # unknown names fail before anything is trained
    unknown = sorted(set(head_options or {}) - set(heads))
    if unknown:
        raise InvalidValueError(f"--head-option names heads that are not compared: {', '.join(unknown)}")
    out = Path(out)
    lock = _prepare_out(out, overwrite)
    try:
        entries: list[CompareEntry] = []
        for head in heads:
            options = head_settings(head, embedding_dim, (head_options or {}).get(head))
            aids = head_aids(create_head(head, embedding_dim, 10, **options))
            settings = {**PRESETS[preset], **aids, **(overrides or {})}
            config = TrainConfig(
                **settings,
                head=head,
                dataset=dataset,
                embedding_dim=embedding_dim,
                head_options=options,
            )
            t0 = time.perf_counter()
            result = train(config, out / head, overwrite=overwrite, progress=progress, log=log)  # warns if infeasible
            notes = margin_feasibility(head, options, embedding_dim, int(result.model.num_classes))
            if result.status != "completed":
                raise InvalidValueError(f"training of head '{head}' stopped before the end; nothing compared")
            entries.append(
                CompareEntry(
                    head=head,
                    options=options,
                    test_accuracy=result.test_accuracy,
                    metrics=dict(result.eval.get("metrics", {})),
                    train_seconds=result.train_seconds,
                    total_seconds=time.perf_counter() - t0,
                    warnings=notes,
                    aids={k: settings[k] for k in aids},
                    embeddings=result.embeddings,
                    labels=result.labels,
                )
            )
        plot_compare(entries, out / "compare.png", title=f"{dataset}, {embedding_dim}-D features, preset {preset}")
        table = compare_table(entries)
        aids = "".join(f"- `{e.head}`: `{json.dumps(e.aids, sort_keys=True)}`\n" for e in entries if e.aids)
        atomic_write_text(
            out / "compare.md",
            f"# headreg compare: {dataset}, {embedding_dim}-D features, preset `{preset}`\n\n{table}\n\n"
            f"Preset: `{json.dumps({**PRESETS[preset], **(overrides or {})}, sort_keys=True)}`\n"
            + (f"\nHead aids (`headreg.compare.HEAD_AIDS`):\n\n{aids}" if aids else ""),
        )
        atomic_write_text(
            out / "compare.json",
            json.dumps(
                {
                    "dataset": dataset,
                    "embedding_dim": embedding_dim,
                    "preset": preset,
                    "settings": {**PRESETS[preset], **(overrides or {})},
                    "head_aids": HEAD_AIDS,
                    "heads": [json_safe(e.row()) for e in entries],
                },
                indent=2,
                sort_keys=True,
            )
            + "\n",
        )
        return entries
    finally:
        lock.release()


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.3f}"


def compare_table(entries: list[CompareEntry]) -> str:
    """A Markdown table: head, options, test accuracy (%), precision@1 (%), MAP@R (%), NMI, training time."""
    lines = [
        "| head | options | test acc. % | P@1 % | MAP@R % | NMI | train s | total s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        r = e.row()
        opts = ", ".join(f"{k}={v}" for k, v in e.options.items()) or "defaults"
        lines.append(
            f"| {e.head} | {opts} | {_fmt(r['test_accuracy'], True)} | {_fmt(r['precision_at_1'], True)} | "
            f"{_fmt(r['mean_average_precision_at_r'], True)} | {_fmt(r['nmi'])} | {r['train_seconds']:.1f} | "
            f"{r['total_seconds']:.1f} |"
        )
    return "\n".join(lines)


def _angular(head: str) -> bool:
    """Whether ``head``'s class declares it angular (its features are then also drawn on the unit circle)."""
    from .heads import head_is_angular
    from .registry import get_head_class

    try:
        return head_is_angular(get_head_class(head))
    except UnknownHeadError:  # a figure of runs whose plugin is gone: draw what is known
        return False


def plot_compare(entries: list[CompareEntry], path: str | Path, title: str = "") -> Path:
    """One column per head: its test features; below, for angular heads, the same features on the unit circle."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .plotting import plot_embeddings

    n = len(entries)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), dpi=110, squeeze=False)
    try:
        for i, e in enumerate(entries):
            emb, labels = e.embeddings, e.labels
            acc = f"{100 * e.test_accuracy:.2f}%" if e.test_accuracy is not None else "n/a"
            top, bottom = axes[0, i], axes[1, i]
            plot_embeddings(top, emb, labels, title=f"{e.head}\ntest acc. {acc}")
            if _angular(e.head):
                plot_embeddings(bottom, emb, labels, title="normalised", normalize=True)
            else:
                bottom.axis("off")
            for ax in (top, bottom):
                legend = ax.get_legend()
                if legend is not None and i != n - 1:
                    legend.remove()
                ax.tick_params(labelsize=7)
                ax.xaxis.label.set_size(7)
                ax.yaxis.label.set_size(7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        with atomic_output(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path
