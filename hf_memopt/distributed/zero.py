"""torch's ``ZeroRedundancyOptimizer(optimizer_class=MemoryAugmentedAdamW, ...)`` under DDP.

ZeRO gives each rank's inner optimizer a subset of the parameters (moments and memory are
sharded by parameter), but DDP has already all-reduced every gradient to every rank. So a
tensor's norm is exact locally, and ``key="tensor"`` needs nothing. ``key="group"`` needs the
sum over the *whole* group, most of which this rank does not optimize: it is computed from
the replicated gradients of all the group's parameters, again without any collective.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from .. import memory as mem
from ._owner import calling_wrapper
from .reducer import Layout, ShardedNormReducer, TensorMap, Unit


def is_zero(owner: Any) -> bool:
    """True for a ``torch.distributed.optim.ZeroRedundancyOptimizer``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(owner, ZeroRedundancyOptimizer)


def find_zero(optimizer: Any) -> Any | None:
    """The ZeroRedundancyOptimizer whose ``step()`` is running ``optimizer``'s, if any."""
    return calling_wrapper(optimizer, is_zero)


class ZeroLayout(Layout):
    """Full tensors: every parameter of the ZeRO optimizer, in its ``param_groups`` order."""

    def __init__(self, zero: Any) -> None:
        self._zero = weakref.ref(zero)

    def _all(self) -> list[tuple[int, Tensor]]:
        zero = self._zero()
        if zero is None:
            raise RuntimeError("the ZeroRedundancyOptimizer of this reducer no longer exists")
        return [(gi, p) for gi, g in enumerate(zero.param_groups) for p in g["params"]]

    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        everything = self._all()
        index = {id(p): t for t, (_gi, p) in enumerate(everything)}
        zero = self._zero()
        return TensorMap(
            unit_tensor=np.array([index[id(p)] for p, _ in units], dtype=np.int64),
            tensor_group=np.array([gi for gi, _ in everything], dtype=np.int64),
            n_tensors=len(everything),
            check_groups=[(getattr(zero, "process_group", None), np.arange(len(everything), dtype=np.int64))],
        )

    def full_sq(self, units: Sequence[Unit], local_sq: Tensor, tmap: TensorMap) -> Tensor:
        everything = self._all()
        with_grad = [t for t, (_gi, p) in enumerate(everything) if p.grad is not None]
        full = local_sq.new_zeros(tmap.n_tensors)
        if with_grad:
            sq = mem.batched_sq_norms([everything[t][1].grad for t in with_grad]).to(full.device)
            full[np.array(with_grad)] = sq
        return full


def attach(zero: Any, check: bool = False) -> ShardedNormReducer:
    """Give the inner optimizer of ``zero`` exact group priorities (automatic at the first step)."""
    reducer = ShardedNormReducer(zero.optim, ZeroLayout(zero), check=check)
    zero.optim.norm_reducer = reducer
    return reducer
