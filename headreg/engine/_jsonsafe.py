"""NaN and infinities out of JSON records: the one cleaning that eval.json, compare.json and the CLI share.

``json.dumps`` writes a non-finite float as ``NaN`` or ``Infinity``, which is not JSON: strict
readers (``jq``, JavaScript's ``JSON.parse``) reject the whole file. A metric that comes out NaN for
a run is therefore recorded as ``null``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth of nested dicts, replaced by None.

    Args:
        obj: A float, a dict (nested dicts are cleaned too) or anything else, returned as it is. Lists and
            tuples are left alone: the records cleaned here keep their floats in dicts.

    Returns:
        A new dict where ``obj`` is one (the input is never mutated), else ``obj`` or None.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    return obj
