"""Adapters that make the memory exact under sharding (SPEC section 6).

The engine only sees ``optimizer.norm_reducer``: a callable that turns the local squared
norms of a step's units into full-tensor ones, identical on every rank. The explicit calls
install it (the documented primary path):

* FSDP2 ``fully_shard`` / DTensors: :func:`.dtensor.attach` (``optimizer``);
* FSDP1 with ``use_orig_params=True``: :func:`.fsdp1.attach` (``optimizer, model``);
* ``ZeroRedundancyOptimizer`` with ``key="group"``: :func:`.zero.attach` (``zero_optimizer``);
* DeepSpeed ZeRO-1/2/3: :func:`.deepspeed.bind` (``engine``; ``Trainer`` does it itself).

Without one, the optimizer's first step asks :func:`auto_reducer` (:mod:`.auto`, the only place
that detects anything; ``HF_MEMOPT_AUTO_SHARDING=0`` or ``optimizer.auto_sharding = False``
switches it off). Plain tensors (one process, DDP) need nothing.

``HF_MEMOPT_CHECK_RANKS=1`` or :func:`check_rank_consistency` adds the rank check of
:mod:`.consistency`.
"""

from __future__ import annotations

from typing import Any

from .auto import auto_reducer
from .consistency import RankDivergenceError
from .reducer import Layout, ShardedNormReducer, TensorMap
from .shutdown import shutdown_process_group

__all__ = [
    "Layout",
    "RankDivergenceError",
    "ShardedNormReducer",
    "TensorMap",
    "auto_reducer",
    "check_rank_consistency",
    "shutdown_process_group",
]


def check_rank_consistency(optimizer: Any, enabled: bool = True) -> None:
    """Turn the per-step rank-consistency check on or off for ``optimizer`` (see :mod:`.consistency`).

    Works before or after the first step; under plain DDP it installs a checking reducer that
    changes no number.
    """
    optimizer.check_rank_consistency = enabled
    reducer = getattr(optimizer, "norm_reducer", None)
    if isinstance(reducer, ShardedNormReducer):
        reducer.check = enabled
    elif enabled and reducer is None:
        optimizer._auto_reducer_checked = False  # let the next step pick a checking reducer
