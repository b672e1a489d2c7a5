"""Where the embedded defaults live on disk.

One directory holds everything: the verified registry archives (``archives/``), the members read out
of them (``extracted/``) and converted models (``models/``). It is resolved per call, so tests and users
can point it elsewhere with ``HF_MEMOPT_CACHE`` without re-importing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_memopt._env import cache_root as _cache_root


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache directory (:func:`hf_memopt._env.cache_root`), creating it if needed.

    Precedence: the ``cache_dir`` argument, then the ``HF_MEMOPT_CACHE`` environment variable, then
    ``$XDG_CACHE_HOME/hf_memopt`` (``~/.cache/hf_memopt`` when ``XDG_CACHE_HOME`` is unset).
    """
    root = _cache_root(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


EXTRA_INSTALL = 'pip install "hf_memopt[examples]"'


def missing_examples_extra(err: ModuleNotFoundError, needed_by: str) -> ImportError:
    """The ``ImportError`` for a loader whose dependency (``datasets``, ...) is not installed."""
    missing = err.name or "a dependency"
    return ImportError(
        f"{needed_by} needs the '{missing}' package, which is part of hf_memopt's 'examples' extra and not of the "
        f"core install: {EXTRA_INSTALL} (or pip install {missing})."
    )
