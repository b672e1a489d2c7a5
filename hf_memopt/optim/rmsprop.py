"""Memory-augmented RMSprop: torch's RMSprop update (alpha, centered, momentum, coupled L2) on the aggregate."""

from __future__ import annotations

from typing import Any

import torch

from ..config import MemoryConfig
from .base import MemoryAugmentedOptimizer
from .updates import RMSPROP


class MemoryAugmentedRMSprop(MemoryAugmentedOptimizer, torch.optim.RMSprop):
    """RMSprop on the aggregate of the gradient and a memory of critical past gradients.

    Takes every argument of :class:`torch.optim.RMSprop` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation``, ``key``, ``buffer_dtype``, ``executor`` (``"auto"``, ``"torch"`` or
    ``"triton"``: the CPU kernel is Adam's) and ``save_memory`` (see :class:`hf_memopt.MemoryAugmentedAdamW`).
    Coupled L2 weight decay is added after aggregation.
    """

    _base_update = RMSPROP

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        topc: int = MemoryConfig.topc,
        decay: float = MemoryConfig.decay,
        kappa: float = MemoryConfig.kappa,
        aggregation: str = "mean",
        key: str = MemoryConfig.key,
        buffer_dtype: torch.dtype | str | None = None,
        executor: str = "auto",
        save_memory: bool = True,
    ) -> None:
        self._setup_memory(MemoryConfig(topc, decay, kappa, aggregation, key, buffer_dtype), executor, save_memory)
        torch.optim.RMSprop.__init__(
            self,
            params,
            lr,
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable,
        )
        self._finish_setup()
