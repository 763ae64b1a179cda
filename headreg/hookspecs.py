"""The hooks a headreg plugin can implement.

A plugin is a module (or object) with functions marked ``@headreg.hookimpl``, found
through the ``headreg`` entry-point group. Built-in heads register through the same
hook, so they are no different from a plugin's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookspec", "hookimpl", "RegisterHead"]

hookspec = pluggy.HookspecMarker("headreg")
hookimpl = pluggy.HookimplMarker("headreg")

#: ``register(name, head_class)``: the callback a plugin receives.
RegisterHead = Callable[[str, Any], None]


@hookspec
def register_heads(register: RegisterHead) -> None:
    """Register loss heads by calling ``register(name, head_class)`` once per head.

    ``head_class`` is any ``torch.nn.Module`` subclass built as
    ``head_class(in_features, num_classes, **options)`` whose
    ``forward(embeddings, labels=None)`` returns ``headreg.HeadOutput(loss, logits)``
    when labels are given and a ``(B, C)`` logits tensor without margin otherwise.
    Names are lower-case identifiers; a name another source already gave is an error
    that names both sources.

    Example::

        @headreg.hookimpl
        def register_heads(register):
            register("myface", MyFaceHead)
    """
