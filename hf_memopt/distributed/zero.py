"""torch's ``ZeroRedundancyOptimizer(optimizer_class=MemoryAugmentedAdamW, ...)`` under DDP.

ZeRO gives each rank's inner optimizer a subset of the parameters (moments and memory are
sharded by parameter), but DDP has already all-reduced every gradient to every rank. So a
tensor's norm is exact locally, and ``key="tensor"`` needs nothing. ``key="group"`` needs the
sum over the *whole* group, most of which this rank does not optimize: it is computed from
the replicated gradients of all the group's parameters, again without any collective.

The inner optimizer cannot tell from its parameters that a ``ZeroRedundancyOptimizer`` holds it
(they are whole tensors, as under DDP), so ``key="group"`` needs the explicit
:func:`attach`; ``key="tensor"`` works without it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..engine.norms import local_sq_norms
from .reducer import Layout, ShardedNormReducer, TensorMap, Unit

logger = logging.getLogger("hf_memopt.distributed")


def is_zero(owner: Any) -> bool:
    """True for a ``torch.distributed.optim.ZeroRedundancyOptimizer``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(owner, ZeroRedundancyOptimizer)


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
            sq = local_sq_norms([everything[t][1].grad for t in with_grad])[0].to(full.device)
            full[np.array(with_grad)] = sq
        return full


def attach(zero: Any, check: bool = False) -> ShardedNormReducer:
    """Give the inner optimizer of ``zero`` (a ``ZeroRedundancyOptimizer``) exact group priorities.

    Needed for ``key="group"`` (the sum over the whole group, most of which other ranks
    optimize); harmless for ``key="tensor"``. Call after building ``zero``, before its first
    step. ``check``: also run the rank-consistency check every step. Returns the reducer.
    """
    if not is_zero(zero):
        raise TypeError(
            "hf_memopt.distributed.zero.attach needs a torch.distributed.optim.ZeroRedundancyOptimizer, "
            f"got {type(zero).__name__}"
        )
    inner = zero.optim
    if not hasattr(inner, "bind_segments"):
        raise TypeError(
            f"hf_memopt.distributed.zero.attach: the ZeroRedundancyOptimizer's optimizer_class is "
            f"{type(inner).__name__}, not a hf_memopt memory-augmented optimizer"
        )
    reducer = ShardedNormReducer(inner, ZeroLayout(zero), check=check)
    inner.norm_reducer = reducer
    logger.info(
        "%s: attached to a ZeroRedundancyOptimizer (%d tensors over all ranks): group sums from the replicated "
        "gradients, no collective",
        type(inner).__name__,
        sum(len(g["params"]) for g in zero.param_groups),
    )
    return reducer
