"""Deterministic train/validation assignment that does not depend on row order or on a random seed."""

from __future__ import annotations

import hashlib


def hash_unit(key: str, salt: str) -> float:
    """Map ``key`` to a number in [0, 1), the same on every machine and Python version.

    ``salt`` names the dataset so that two datasets sharing ids do not share their validation rows.
    """
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_validation(key: str, salt: str, fraction: float) -> bool:
    """Whether the row or work named ``key`` belongs to the validation split of size about ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be strictly between 0 and 1; got {fraction!r}")
    return hash_unit(key, salt) < fraction
