"""Memory-augmented SGD: torch's SGD update (momentum, dampening, nesterov, coupled L2) on the aggregate."""

from __future__ import annotations

from typing import Any

import torch

from ..config import MemoryConfig
from .base import MemoryAugmentedOptimizer
from .updates import SGD


class MemoryAugmentedSGD(MemoryAugmentedOptimizer, torch.optim.SGD):
    """SGD on the aggregate of the gradient and a memory of critical past gradients.

    Takes every argument of :class:`torch.optim.SGD` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation`` (default ``"sum"``, as in the paper's SGD), ``key``, ``buffer_dtype``,
    ``executor`` (``"auto"``, ``"torch"`` or ``"triton"``: the CPU kernel is Adam's) and ``save_memory``
    (see :class:`hf_memopt.MemoryAugmentedAdamW`). Coupled L2 weight decay is added after
    aggregation. Sparse gradients: with the memory off (kappa=0) only, as torch's SGD takes them.
    """

    _base_update = SGD

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        topc: int = MemoryConfig.topc,
        decay: float = MemoryConfig.decay,
        kappa: float = MemoryConfig.kappa,
        aggregation: str = "sum",
        key: str = MemoryConfig.key,
        buffer_dtype: torch.dtype | str | None = None,
        executor: str = "auto",
        save_memory: bool = True,
    ) -> None:
        self._setup_memory(MemoryConfig(topc, decay, kappa, aggregation, key, buffer_dtype), executor, save_memory)
        torch.optim.SGD.__init__(
            self,
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._finish_setup()

    def _init_group(self, group: dict[str, Any], params: list, grads: list, momentum_buffer_list: list) -> bool:
        has_sparse = torch.optim.SGD._init_group(self, group, params, grads, momentum_buffer_list)
        if has_sparse and MemoryConfig.from_group(group).kappa > 0.0:
            # with the memory off the group is torch's SGD, which takes sparse gradients
            raise RuntimeError(
                f"{type(self).__name__}: sparse gradients are not supported with the memory on (kappa > 0): the "
                "memory stores dense gradient-shaped slots; use kappa=0 for this group (torch's SGD) or dense "
                "gradients (e.g. nn.Embedding(sparse=False))"
            )
        return has_sparse
