"""FSDP1 (``FullyShardedDataParallel``) with ``use_orig_params=True``.

Every rank holds a 1-D slice (possibly empty, then without a gradient) of every original
parameter, in the same order, so unit ``i`` is full tensor ``i`` on every rank and its full
norm is the sum of the slices' squared norms over the FSDP unit's process group (the shard
group under ``HYBRID_SHARD``). ``use_orig_params=False`` hands the optimizer FlatParameters,
whose memory would mix unrelated tensors: refused with the fix.

The original parameters carry no link to their FSDP unit or its process group (only the
``_fsdp_flattened`` mark), so the group comes from the wrapped model: :func:`attach` is needed,
and a first step without it raises a ``ValueError`` that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .reducer import Layout, ShardedNormReducer, TensorMap, Unit, group_key

logger = logging.getLogger("hf_memopt.distributed")

USE_ORIG_PARAMS_ERROR = (
    "hf_memopt: the optimizer was given FSDP1 FlatParameters (FullyShardedDataParallel with "
    "use_orig_params=False); a critical-gradient memory needs the original parameters. Wrap the model "
    "with FullyShardedDataParallel(..., use_orig_params=True) (accelerate: fsdp_use_orig_params: true; "
    "Trainer: fsdp_config={'use_orig_params': True}), or use FSDP2 (fully_shard)."
)


def attach_error(why_off: str = "") -> str:
    """The error of a first step on FSDP1 original parameters without :func:`attach`."""
    off = f" (sharding auto-detection is off: {why_off})" if why_off else ""
    return (
        "hf_memopt: the optimizer holds FSDP1 original parameters (FullyShardedDataParallel with "
        f"use_orig_params=True) but no norm reducer{off}; the parameters do not say which process group "
        "shards them, and shard-local norms would make the ranks diverge. Call "
        "hf_memopt.distributed.fsdp1.attach(optimizer, model) with the FSDP-wrapped model before the first "
        "step, or use FSDP2 (fully_shard), which needs no call."
    )


def is_flat_param(p: Any) -> bool:
    """True for an FSDP1 ``FlatParameter`` (what the optimizer sees with ``use_orig_params=False``)."""
    return bool(getattr(p, "_is_flat_param", False))


def is_orig_param(p: Any) -> bool:
    """True for an original parameter that FSDP1 flattened (``use_orig_params=True``)."""
    return bool(getattr(p, "_fsdp_flattened", False)) and not is_flat_param(p)


def process_groups(params: Iterable[torch.Tensor], root: nn.Module) -> dict[int, Any]:
    """``id(param)`` -> the process group that shards it, for the FSDP1 original parameters under ``root``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wanted = {id(p) for p in params}
    found: dict[int, Any] = {}
    for module in FSDP.fsdp_modules(root):
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
                    "hf_memopt: a parameter of the optimizer is not managed by any FSDP module of the model "
                    "given to hf_memopt.distributed.fsdp1.attach(optimizer, model); pass the FSDP-wrapped "
                    "model that holds all of the optimizer's parameters"
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


def attach(optimizer: Any, model: nn.Module, check: bool = False) -> ShardedNormReducer:
    """Make ``optimizer`` exact under the FSDP1 ``model`` (``use_orig_params=True``); returns the reducer.

    Required with FSDP1: call it after building the optimizer, before its first step (and again
    after ``add_param_group``). ``model``: the FSDP-wrapped root that holds the optimizer's
    parameters. ``check``: also run the rank-consistency check every step.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(is_flat_param(p) for p in params):
        raise ValueError(USE_ORIG_PARAMS_ERROR)
    groups = process_groups(params, model)
    reducer = ShardedNormReducer(optimizer, FSDP1Layout(groups), check=check)
    optimizer.norm_reducer = reducer
    logger.info(
        "%s: attached to FSDP1 (%d original parameters over %d process group(s))",
        type(optimizer).__name__,
        len(groups),
        len({group_key(g) for g in groups.values()}),
    )
    return reducer
