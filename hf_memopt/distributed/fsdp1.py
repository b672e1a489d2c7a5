"""FSDP1 (``FullyShardedDataParallel``) with ``use_orig_params=True``.

Every rank holds a 1-D slice (possibly empty, then without a gradient) of every original
parameter, in the same order, so unit ``i`` is full tensor ``i`` on every rank and its full
norm is the sum of the slices' squared norms over the FSDP unit's process group (the shard
group under ``HYBRID_SHARD``). ``use_orig_params=False`` hands the optimizer FlatParameters,
whose memory would mix unrelated tensors: refused with the fix.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .reducer import Layout, ShardedNormReducer, TensorMap, Unit, group_key

USE_ORIG_PARAMS_ERROR = (
    "hf_memopt: the optimizer was given FSDP1 FlatParameters (FullyShardedDataParallel with "
    "use_orig_params=False); a critical-gradient memory needs the original parameters. Wrap the model "
    "with FullyShardedDataParallel(..., use_orig_params=True) (accelerate: fsdp_use_orig_params: true; "
    "Trainer: fsdp_config={'use_orig_params': True}), or use FSDP2 (fully_shard)."
)


def is_flat_param(p: Any) -> bool:
    """True for an FSDP1 ``FlatParameter`` (what the optimizer sees with ``use_orig_params=False``)."""
    return bool(getattr(p, "_is_flat_param", False))


def is_orig_param(p: Any) -> bool:
    """True for an original parameter that FSDP1 flattened (``use_orig_params=True``)."""
    return bool(getattr(p, "_fsdp_flattened", False)) and not is_flat_param(p)


def _fsdp_modules(root: nn.Module | None) -> Iterable[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if root is not None:
        return FSDP.fsdp_modules(root)
    # No model given: the FSDP wrappers alive in this process (a one-time scan at the first step).
    return [o for o in gc.get_objects() if isinstance(o, FSDP)]


def process_groups(params: Iterable[torch.Tensor], root: nn.Module | None = None) -> dict[int, Any]:
    """``id(param)`` -> the process group that shards it, for FSDP1 original parameters."""
    wanted = {id(p) for p in params}
    found: dict[int, Any] = {}
    for module in _fsdp_modules(root):
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        for p in getattr(flat, "_params", None) or ():
            if id(p) in wanted:
                found[id(p)] = module.process_group
    return found


class FSDP1Layout(Layout):
    """Units are the original parameters' local slices, identical in order on every rank."""

    def __init__(self, groups: dict[int, Any]) -> None:
        self._groups = groups

    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        by_group: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        for ui, (p, _si) in enumerate(units):
            if id(p) not in self._groups:
                raise RuntimeError(
                    "hf_memopt: a parameter of the optimizer is not managed by any FSDP module found; "
                    "call hf_memopt.distributed.fsdp1.attach(optimizer, model) with the FSDP-wrapped model"
                )
            group = self._groups[id(p)]
            by_group.setdefault(group_key(group), (group, []))[1].append(ui)
        pairs = [(g, np.array(idx, dtype=np.int64)) for g, idx in by_group.values()]
        n = len(units)
        return TensorMap(
            unit_tensor=np.arange(n, dtype=np.int64),
            tensor_group=np.array([param_group[id(p)] for p, _ in units], dtype=np.int64),
            n_tensors=n,
            reductions=pairs,
            check_groups=pairs,
        )


def layout_for(optimizer: Any, root: nn.Module | None = None) -> FSDP1Layout:
    """The FSDP1 layout of ``optimizer``'s parameters (``root``: the wrapped model, else found in memory)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return FSDP1Layout(process_groups(params, root))


def attach(optimizer: Any, model: nn.Module, check: bool = False) -> ShardedNormReducer:
    """Make ``optimizer`` exact under FSDP1 ``model`` (``use_orig_params=True``); returns the reducer.

    Optional: the first step finds the FSDP modules by itself. Call it to skip that scan, or
    when several FSDP models live in the process.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_flat_param(p) for p in params):
        raise ValueError(USE_ORIG_PARAMS_ERROR)
    reducer = ShardedNormReducer(optimizer, FSDP1Layout(process_groups(params, model)), check=check)
    optimizer.norm_reducer = reducer
    return reducer
