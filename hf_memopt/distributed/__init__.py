"""Adapters that make the memory exact under sharding (SPEC section 6).

The engine only sees ``optimizer.norm_reducer``: a callable that turns the local squared
norms of a step's units into full-tensor ones, identical on every rank. At the first step
:func:`auto_reducer` picks it from the parameters and the caller:

* plain tensors (one process, DDP): None, nothing to do;
* DTensors (FSDP2 ``fully_shard``, tensor parallel): :mod:`.dtensor`;
* FSDP1 original parameters (``use_orig_params=True``): :mod:`.fsdp1`; FlatParameters: an error;
* inside ``ZeroRedundancyOptimizer.step``: :mod:`.zero` (only ``key="group"`` needs it);
* inside a DeepSpeed ZeRO optimizer's step: :mod:`.deepspeed` (bound segments, else one
  priority per partition and a warning).

``HF_MEMOPT_CHECK_RANKS=1`` or :func:`check_rank_consistency` adds the rank check of
:mod:`.consistency`.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..memory import NormReducer
from . import consistency
from .consistency import RankDivergenceError
from .reducer import Layout, ShardedNormReducer, TensorMap

__all__ = [
    "Layout",
    "RankDivergenceError",
    "ShardedNormReducer",
    "TensorMap",
    "auto_reducer",
    "check_rank_consistency",
]


def _params(optimizer: Any) -> list[Any]:
    return [p for g in optimizer.param_groups if g.get("kappa", 1.0) > 0.0 for p in g["params"]]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def auto_reducer(optimizer: Any) -> NormReducer | None:
    """The norm reducer the layout of ``optimizer``'s parameters needs (None: unsharded).

    Called by the optimizer at its first step (and again after ``add_param_group``).
    Raises ``ValueError`` naming the fix for a layout that cannot be served exactly.
    """
    from . import fsdp1
    from .dtensor import DTensorLayout, is_dtensor

    params = _params(optimizer)
    if any(fsdp1.is_flat_param(p) for p in params):
        raise ValueError(fsdp1.USE_ORIG_PARAMS_ERROR)
    if not _distributed():
        return None
    check = consistency.requested() or bool(getattr(optimizer, "check_rank_consistency", False))
    if any(is_dtensor(p) for p in params):
        return ShardedNormReducer(optimizer, DTensorLayout(), check=check)
    if any(fsdp1.is_orig_param(p) for p in params):
        return ShardedNormReducer(optimizer, fsdp1.layout_for(optimizer), check=check)
    return _wrapped(optimizer, check)


def _wrapped(optimizer: Any, check: bool) -> NormReducer | None:
    """Plain tensors: replicated, unless a ZeRO wrapper is stepping us."""
    from . import deepspeed, zero

    ds = deepspeed.find_zero_optimizer(optimizer)
    if ds is not None:
        try:
            deepspeed.bind(ds, check=check)  # exact, if no memory was laid out per partition yet
            return optimizer.norm_reducer
        except RuntimeError:
            return deepspeed.unbound_reducer(optimizer, ds, check=check)
    owner = zero.find_zero(optimizer)
    if owner is not None and (check or any(g.get("key") == "group" for g in optimizer.param_groups)):
        return ShardedNormReducer(optimizer, zero.ZeroLayout(owner), check=check)
    if check:
        from .replicated import ReplicatedLayout

        return ShardedNormReducer(optimizer, ReplicatedLayout(), check=True)
    return None


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
