"""Small facts read from the environment, each in one place: boolean switches and the cache folder."""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: Where hf_memopt keeps what it builds or downloads (the CPU kernel, data archives).
CACHE_ENV = "HF_MEMOPT_CACHE"


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean switch ``name`` (``1/true/yes/on`` or ``0/false/no/off``, any case); ``default`` when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$HF_MEMOPT_CACHE``, else ``$XDG_CACHE_HOME/hf_memopt`` (``~/.cache/hf_memopt``)."""
    if override is not None:
        return Path(override)
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "hf_memopt"


#: Comma-separated executors ("cpu", "triton") and native parts ("guard": the C++ state check of
#: :mod:`hf_memopt.engine.native_guard`) that must be available: under it a kernel that fails to
#: build or import is an error instead of a quiet fall-back to "torch" (CI sets it, so a broken kernel
#: cannot turn into a green run with fewer tests).
REQUIRE_EXECUTORS_ENV = "HF_MEMOPT_REQUIRE_EXECUTORS"


def required_executors() -> frozenset[str]:
    """The executors named in ``$HF_MEMOPT_REQUIRE_EXECUTORS`` (empty when unset); an unknown name is an error."""
    names = frozenset(n.strip().lower() for n in os.environ.get(REQUIRE_EXECUTORS_ENV, "").split(",") if n.strip())
    unknown = names - {"cpu", "triton", "guard"}
    if unknown:
        raise ValueError(
            f"{REQUIRE_EXECUTORS_ENV} names {sorted(unknown)}; allowed: 'cpu', 'triton', 'guard' (comma-separated)"
        )
    return names
