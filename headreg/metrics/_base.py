"""What the metric families share: the stored-embeddings ``Metric`` base and a delayed progress bar.

The input checks themselves live in :mod:`headreg._checks` (one module, one wording per fault).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["stage_bar"]


@contextlib.contextmanager
def stage_bar(desc: str, total: int | None, unit: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar on stderr for one stage of a metric, shown only once the stage has run for 2 s.

    Short work prints nothing; long work (k-means at large k, a million pairs) never looks hung.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, delay=2.0, leave=False, mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()
