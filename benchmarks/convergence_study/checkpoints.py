"""Checkpoints of a run in progress: model, optimizer (with its memory), lr schedule, data position, RNG state
and the curve so far, written after each evaluation so that the same command started again continues from
there and ends with the same numbers as an uninterrupted run.

They live outside the work tree by default (``<HF_MEMOPT_CACHE>/convergence-checkpoints``, see
:func:`default_dir`), one file per run named by a digest of the run's identity (:func:`path_for`), and are
deleted when the run's result line is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from hf_memopt._env import cache_root

FORMAT = 1


def default_dir() -> Path:
    """``<cache>/convergence-checkpoints``, the cache being ``HF_MEMOPT_CACHE`` or ``~/.cache/hf_memopt``."""
    return cache_root().expanduser() / "convergence-checkpoints"


def path_for(folder: Path, run: dict[str, Any]) -> Path:
    """The checkpoint file of ``run`` (a :func:`convergence_study.store.run_key`) in ``folder``."""
    digest = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{run['task']}-{run['optimizer']}-seed{run['seed']}-{digest}.pt"


def save(path: Path, run: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``state`` for ``run`` to ``path`` whole or not at all (a stop while writing keeps the last one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "run": run, **state}, tmp)
    os.replace(tmp, path)


def load(path: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """The state saved for ``run`` at ``path``; None when there is none.

    Raises:
        ValueError: the file belongs to another run or was written in another format.
    """
    if not path.exists():
        return None
    # weights_only=False: the file holds RNG states and the curve besides tensors, and was written by this module
    state = torch.load(path, weights_only=False)
    if state.get("format") != FORMAT or state.get("run") != run:
        raise ValueError(
            f"checkpoint {path} is of {state.get('run')} (format {state.get('format')}), not of {run} "
            f"(format {FORMAT}); delete it to start the run over"
        )
    return state
