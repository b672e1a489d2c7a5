"""Find the optimizer that wraps ours (torch's ZeRO, a DeepSpeed ZeRO stage) from the call stack.

Wrappers build our optimizer themselves and call its ``step()`` from their own; nothing
else links the two. The first step walks a few frames up, once, to find the wrapper that
holds ``optimizer`` under one of the given attribute names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_MAX_DEPTH = 24


def calling_wrapper(optimizer: Any, accept: Callable[[Any], bool]) -> Any | None:
    """The nearest ``self`` up the stack that holds ``optimizer`` (as ``.optim``/``.optimizer``) and passes ``accept``."""
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and owner is not optimizer:
            held = getattr(owner, "optim", None) is optimizer or getattr(owner, "optimizer", None) is optimizer
            if held and accept(owner):
                return owner
        frame = frame.f_back
    return None


def module_of(obj: Any) -> str:
    """The module that defines ``obj``'s class."""
    return type(obj).__module__ or ""
