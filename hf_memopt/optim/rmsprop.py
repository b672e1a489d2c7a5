"""Memory-augmented RMSprop: torch's RMSprop update (alpha, centered, momentum, coupled L2) on the aggregate."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.rmsprop import rmsprop as _rmsprop

from ..config import MemoryConfig
from .base import Lists, MemoryAugmentedOptimizer


class MemoryAugmentedRMSprop(MemoryAugmentedOptimizer, torch.optim.RMSprop):
    """RMSprop on the aggregate of the gradient and a memory of critical past gradients.

    Takes every argument of :class:`torch.optim.RMSprop` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation``, ``key`` and ``buffer_dtype`` (see :class:`hf_memopt.MemoryAugmentedAdamW`).
    Coupled L2 weight decay is added after aggregation.
    """

    _list_names = ("params", "grads", "square_avgs", "momentum_buffer_list", "grad_avgs", "state_steps")

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
    ) -> None:
        self._setup_memory(
            topc=topc, decay=decay, kappa=kappa, aggregation=aggregation, key=key, buffer_dtype=buffer_dtype
        )
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

    step = MemoryAugmentedOptimizer.step

    def _update(self, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        _rmsprop(
            lists["params"],
            lists["grads"],
            lists["square_avgs"],
            lists["grad_avgs"],
            lists["momentum_buffer_list"],
            lists["state_steps"],
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=extra,
        )
