"""Memory-augmented Adam and AdamW: torch's Adam(W) update on the aggregated gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam as _adam

from ..config import MemoryConfig
from .base import Lists, MemoryAugmentedOptimizer

_ADAM_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


class _AdamUpdate(MemoryAugmentedOptimizer):
    _list_names = _ADAM_LISTS
    _has_cpu_kernel = True

    def _update(self, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        beta1, beta2 = group["betas"]
        _adam(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"],
            lists["state_steps"],
            amsgrad=group["amsgrad"],
            has_complex=extra,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )


class MemoryAugmentedAdamW(_AdamUpdate, torch.optim.AdamW):
    """AdamW on the aggregate of the gradient and a memory of critical past gradients.

    Takes every argument of :class:`torch.optim.AdamW` plus the memory's (SPEC section 1):

    Args:
        topc: how many past gradients each parameter tensor keeps (C), int >= 1.
        decay: factor every stored priority is multiplied by once per step, 0 < decay <= 1.
        kappa: weight of the memory in the aggregate, finite >= 0; 0 is exactly AdamW.
        aggregation: ``"mean"`` (default), ``"sum"`` or ``"mid"``.
        key: ``"group"`` (one priority per param group: the sum of its tensors' gradient
            norms) or ``"tensor"`` (each tensor's own gradient norm).
        buffer_dtype: dtype of the stored gradients: None (the parameter's), bf16, fp16 or fp32.

    With ``fused=None`` and ``foreach=None`` (the defaults), fp32 CPU parameters take a
    single-pass kernel that does aggregation, admission and the AdamW update together;
    ``fused=True`` / ``foreach=True`` / ``foreach=False`` run torch's fused, foreach or
    for-loop AdamW on the aggregated gradient instead.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
        torch.optim.AdamW.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._finish_setup()

    step = MemoryAugmentedOptimizer.step


class MemoryAugmentedAdam(_AdamUpdate, torch.optim.Adam):
    """Adam (coupled L2 weight decay, added after aggregation) with a critical-gradient memory.

    Takes every argument of :class:`torch.optim.Adam` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation``, ``key`` and ``buffer_dtype`` (see :class:`MemoryAugmentedAdamW`).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
        torch.optim.Adam.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._finish_setup()

    step = MemoryAugmentedOptimizer.step
