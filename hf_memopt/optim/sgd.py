"""Memory-augmented SGD: torch's SGD update (momentum, dampening, nesterov, coupled L2) on the aggregate."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.sgd import sgd as _sgd

from ..config import MemoryConfig
from .base import Lists, MemoryAugmentedOptimizer


class MemoryAugmentedSGD(MemoryAugmentedOptimizer, torch.optim.SGD):
    """SGD on the aggregate of the gradient and a memory of critical past gradients.

    Takes every argument of :class:`torch.optim.SGD` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation`` (default ``"sum"``, as in the paper's SGD), ``key`` and ``buffer_dtype``
    (see :class:`hf_memopt.MemoryAugmentedAdamW`). Coupled L2 weight decay is added after
    aggregation. Sparse gradients are not supported.
    """

    _list_names = ("params", "grads", "momentum_buffer_list")

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
    ) -> None:
        self._setup_memory(
            topc=topc, decay=decay, kappa=kappa, aggregation=aggregation, key=key, buffer_dtype=buffer_dtype
        )
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

    step = MemoryAugmentedOptimizer.step

    def _init_group(self, group: dict[str, Any], params: list, grads: list, momentum_buffer_list: list) -> bool:
        has_sparse = torch.optim.SGD._init_group(self, group, params, grads, momentum_buffer_list)
        if has_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return has_sparse

    def _update(self, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        params, buffers = lists["params"], lists["momentum_buffer_list"]
        _sgd(
            params,
            lists["grads"],
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=False,
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if group["momentum"] != 0:
            # torch's functional SGD creates the momentum buffers on the first step
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
