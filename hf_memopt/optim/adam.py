"""Memory-augmented Adam and AdamW: torch's Adam(W) update on the aggregated gradient."""

from __future__ import annotations

from typing import Any

import torch

from ..config import MemoryConfig
from .base import MemoryAugmentedOptimizer
from .updates import ADAM


class _AdamUpdate(MemoryAugmentedOptimizer):
    _base_update = ADAM


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

        executor: which implementation runs the step (not saved in checkpoints): ``"auto"``
            (default) picks ``"triton"`` (the GPU engine: decisions on the device, no host
            synchronisation, CUDA-graph capturable) for CUDA tensors when Triton imports, ``"cpu"``
            (a single-pass C kernel doing aggregation, admission and the update together) for fp32
            CPU tensors with ``fused=None`` and ``foreach=None``, and ``"torch"`` (multi-tensor torch
            ops, any device) otherwise; ``"torch"``, ``"cpu"`` or ``"triton"`` force one
            (``ValueError`` if it cannot run a group). See :meth:`executor_for`.
        save_memory: False leaves the memory out of ``state_dict()`` (checkpoints of the base
            optimizer's size; a resume then starts with an empty memory, with a warning).

    ``fused=True`` / ``foreach=True`` / ``foreach=False`` run torch's fused, foreach or for-loop
    AdamW on the aggregated gradient (the "torch" executor).
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
        executor: str = "auto",
        save_memory: bool = True,
    ) -> None:
        self._setup_memory(MemoryConfig(topc, decay, kappa, aggregation, key, buffer_dtype), executor, save_memory)
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


class MemoryAugmentedAdam(_AdamUpdate, torch.optim.Adam):
    """Adam (coupled L2 weight decay, added after aggregation) with a critical-gradient memory.

    Takes every argument of :class:`torch.optim.Adam` plus ``topc``, ``decay``, ``kappa``,
    ``aggregation``, ``key``, ``buffer_dtype``, ``executor`` and ``save_memory`` (see
    :class:`MemoryAugmentedAdamW`).
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
        executor: str = "auto",
        save_memory: bool = True,
    ) -> None:
        self._setup_memory(MemoryConfig(topc, decay, kappa, aggregation, key, buffer_dtype), executor, save_memory)
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
