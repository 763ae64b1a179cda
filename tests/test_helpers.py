"""The small shared helpers that replaced copies: json_safe, head_key, and DistInfo below the data layer."""

from __future__ import annotations

import json
import math

from headreg.engine._jsonsafe import json_safe
from headreg.registry import head_key


def _not_json(token: str) -> None:
    raise AssertionError(f"{token} is not JSON")


def test_json_safe_replaces_non_finite_floats_at_any_depth_and_copies() -> None:
    record = {"a": math.nan, "b": {"c": math.inf, "d": -math.inf, "e": 0.5}, "f": 3, "g": "x", "h": None}
    clean = json_safe(record)
    assert clean == {"a": None, "b": {"c": None, "d": None, "e": 0.5}, "f": 3, "g": "x", "h": None}
    assert math.isnan(record["a"]) and math.isinf(record["b"]["c"])  # the input is left as it was
    json.loads(json.dumps(clean), parse_constant=_not_json)  # strict JSON: no NaN / Infinity
    assert json_safe(math.nan) is None and json_safe(1.5) == 1.5 and json_safe("nan") == "nan"


def test_head_key_is_the_registry_key_of_a_typed_name() -> None:
    assert head_key(" ArcFace ") == "arcface"
    assert head_key("Modified-Softmax") == "modified_softmax"


def test_dist_info_lives_below_data_and_the_engine_re_exports_it() -> None:
    from headreg import _runtime
    from headreg.data import loader
    from headreg.engine import runtime

    assert runtime.DistInfo is _runtime.DistInfo is loader.DistInfo
    assert runtime.dist_info is _runtime.dist_info
    assert _runtime.dist_info() == _runtime.DistInfo()  # no process group in the tests
