"""The text of ``--val``, ``--val-every`` and ``--keep-best``: parsed and checked before anything is built.

Pure parsing (no torch, no file access), so :class:`~headreg.engine._config.TrainConfig` refuses a malformed
option by its name before a dataset is read; :mod:`headreg.engine._validate` builds the datasets from the
parsed :class:`ValProtocol` values.

``--val PROTOCOL[,PROTOCOL...]`` takes

* ``NAME.bin``: an insightface validation file (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, as in
  insightface's ``val_targets``), a relative path taken from the data directory first, then from the current
  one; evaluated by the pairs protocol (10-fold accuracy with the flip test-time augmentation). Its key in the
  results is the file's stem (``lfw``).
* ``DATASET[@SPLIT]``: any dataset :func:`headreg.data.create_dataset` reads (``mnist@test``, ``fake``,
  ``imagefolder:PATH@val``, ``bin:PATH``, ``lfw:DIR``, ``pairs:LIST.csv``), evaluated leave-one-out on
  ``SPLIT`` (``test`` when omitted), or ``DATASET@QUERY/GALLERY`` for the query/gallery protocol. The last
  ``@`` separates the split because ``:`` already introduces a dataset's path. Its key is the text as given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InvalidValueError

__all__ = [
    "ValProtocol",
    "canonical_every",
    "parse_every",
    "parse_protocols",
    "parse_val",
    "split_best",
    "higher_is_better",
]

_EVERY = re.compile(r"^\s*([0-9]+)\s*(epochs?|steps?)?\s*$", re.IGNORECASE)
#: Metrics where a lower value is better; every other metric headreg reports is better higher.
_LOWER_IS_BETTER = frozenset({"eer", "far"})


@dataclass(frozen=True)
class ValProtocol:
    """One ``--val`` entry.

    Attributes:
        key: its name in ``metrics.jsonl`` and in ``--keep-best SET/METRIC``.
        dataset: the :func:`~headreg.data.create_dataset` name (None for a bare ``.bin`` path).
        split: the split evaluated leave-one-out, or the query split.
        gallery_split: the gallery split of the query/gallery protocol, else None.
        bin_path: a bare ``.bin`` path as given (resolved against the data directory when relative).
    """

    key: str
    dataset: str | None
    split: str = "test"
    gallery_split: str | None = None
    bin_path: str | None = None


def parse_val(items: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"lfw.bin, mnist@test"`` or ``["lfw.bin", "mnist@test"]`` → ``("lfw.bin", "mnist@test")`` (checked)."""
    if items is None:
        return ()
    texts = [items] if isinstance(items, str) else list(items)
    out = tuple(p.strip() for t in texts for p in str(t).split(",") if p.strip())
    parse_protocols(out)  # refuse a malformed entry now
    return out


def parse_protocols(specs: Iterable[str]) -> tuple[ValProtocol, ...]:
    """Each ``--val`` entry as a :class:`ValProtocol`; keys must differ."""
    out = tuple(_parse_one(s) for s in specs)
    keys = [p.key for p in out]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise InvalidValueError(f"--val names {twice[0]!r} twice; give each validation set once")
    return out


def _parse_one(text: str) -> ValProtocol:
    text = text.strip()
    if text.lower().endswith(".bin") and not text.lower().startswith("bin:"):
        stem = re.split(r"[\\/]", text)[-1][: -len(".bin")]
        if not stem:
            raise InvalidValueError(f"--val {text!r}: a .bin file needs a name, e.g. lfw.bin")
        return ValProtocol(key=stem, dataset=None, bin_path=text)
    dataset, at, split = text.rpartition("@") if "@" in text else (text, "", "")
    if not dataset:
        raise InvalidValueError(f"--val {text!r}: expected DATASET[@SPLIT] or NAME.bin, e.g. mnist@test or lfw.bin")
    if at and not split:
        raise InvalidValueError(f"--val {text!r}: nothing after '@'; give a split (mnist@test) or drop the '@'")
    query, slash, gallery = split.partition("/")
    if slash and (not query or not gallery or "/" in gallery):
        raise InvalidValueError(f"--val {text!r}: a query/gallery split reads QUERY/GALLERY, e.g. sop@test/train")
    return ValProtocol(key=text, dataset=dataset, split=query or "test", gallery_split=gallery or None)


def parse_every(text: str | int) -> tuple[int, str]:
    """``--val-every``: ``2`` or ``2epochs`` → ``(2, "epoch")``; ``500steps`` → ``(500, "step")``."""
    m = _EVERY.match(str(text)) if not isinstance(text, bool) else None
    if m is None or int(m.group(1)) < 1:
        raise InvalidValueError(
            f"--val-every must be a positive count of epochs (2, 2epochs) or steps (500steps), got {text!r}"
        )
    unit = (m.group(2) or "epoch").lower().rstrip("s")
    return int(m.group(1)), unit


def canonical_every(text: str | int) -> str:
    """The stored form of ``--val-every``: ``"2"`` for epochs, ``"500steps"`` for steps."""
    n, unit = parse_every(text)
    return str(n) if unit == "epoch" else f"{n}steps"


def split_best(name: str, keys: Iterable[str]) -> tuple[str, str]:
    """``--keep-best``: ``"lfw/kfold_accuracy"`` → ``("lfw", "kfold_accuracy")``; a bare metric needs one set.

    A set's key may hold ``/`` (``csv:/data/x.csv``, ``sop@test/train``) and so may a metric (the per-category
    ``shoes/precision_at_1``), so the longest key that prefixes ``name`` wins.

    Args:
        name: the option's text.
        keys: the keys of the ``--val`` sets.

    Returns:
        ``(set key, metric)``; a bare metric belongs to the only set.
    """
    keys, name = list(keys), name.strip()
    if not keys:
        raise InvalidValueError(f"--keep-best {name} watches a validation metric: give --val too")
    for key in sorted(keys, key=len, reverse=True):
        if name.startswith(key + "/") and len(name) > len(key) + 1:
            return key, name[len(key) + 1 :]
    if not name or name.endswith("/"):
        raise InvalidValueError(f"--keep-best expects [SET/]METRIC, e.g. lfw/kfold_accuracy, got {name!r}")
    if len(keys) > 1:
        head = name.partition("/")[0]
        raise InvalidValueError(
            f"--keep-best {name}: with several --val sets say which one, as SET/METRIC"
            + (f"; {head!r} is not one of them" if "/" in name else "")
            + f" ({', '.join(keys)})"
        )
    return keys[0], name


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is an improvement (all but error rates: ``eer``, ``far``)."""
    return metric not in _LOWER_IS_BETTER and not metric.endswith("_std")
