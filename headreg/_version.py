"""headreg's version, in the bottom layer so that any module can record it without importing the facade."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
