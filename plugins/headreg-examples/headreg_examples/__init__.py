"""headreg-examples: three loss heads shipped the way any third-party headreg plugin ships them.

Installing this distribution is enough: headreg finds :mod:`headreg_examples.plugin` through
the ``headreg`` entry-point group and registers ``adaface``, ``curricularface`` and
``subcenter_arcface``. The classes can also be imported and used directly.
"""

from __future__ import annotations

from .adaface import AdaFaceHead
from .curricularface import CurricularFaceHead
from .subcenter import SubCenterArcFaceHead

__all__ = ["AdaFaceHead", "CurricularFaceHead", "SubCenterArcFaceHead", "__version__"]

__version__ = "0.1.0"
