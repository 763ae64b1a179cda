"""The module the ``headreg`` entry point names: one hook implementation, nothing else.

headreg imports this module on first use of its registry and calls ``register_heads``
with a callback; headreg, not the plugin, keeps track of names, duplicates and origin.
"""

from __future__ import annotations

import headreg
from headreg.hookspecs import RegisterHead

from .adaface import AdaFaceHead
from .curricularface import CurricularFaceHead
from .subcenter import SubCenterArcFaceHead


@headreg.hookimpl
def register_heads(register: RegisterHead) -> None:
    """Register the example heads under their registry names."""
    register("adaface", AdaFaceHead)
    register("curricularface", CurricularFaceHead)
    register("subcenter_arcface", SubCenterArcFaceHead)
