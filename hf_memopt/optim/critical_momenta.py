"""Critical Momenta: AdamW whose memory holds past momenta (SPEC section 1b).

Malviya, Mordido, Baratin, Babanezhad Harikandeh, Huang, Lacoste-Julien, Pascanu, Chandar,
"Promoting Exploration in Memory-Augmented Adam using Critical Momenta", TMLR 2024
(OpenReview sHSkJqyQgW, arXiv 2307.09638).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import MemoryConfig
from .base import MemoryAugmentedOptimizer
from .updates import CRITICAL_MOMENTA

#: The memory's aggregation, fixed: m~ = m + kappa S / n is section 1's "sum" rule applied to m.
#: Param groups record it under ``aggregation`` so that every part of the engine (decisions, the C
#: kernel, checkpoints) reads one rule; it is not an argument.
CM_AGGREGATION = "sum"


class CriticalMomentaAdamW(MemoryAugmentedOptimizer, torch.optim.AdamW):
    """AdamW with a memory of critical past momenta (Critical Momenta, SPEC section 1b).

    Each step, for every parameter with a gradient g: the priority k is g's norm (per ``key``, as
    for :class:`MemoryAugmentedAdamW`); ``p <- p (1 - lr wd)``; ``m <- beta1 m + (1 - beta1) g``;
    ``m~ = m + kappa S / n`` from the n momenta stored before this step (``m~ = m`` when n = 0 or
    kappa = 0); m (cast to ``buffer_dtype``) is admitted with priority k by SPEC section 1's rule;
    ``v`` and ``p`` take AdamW's update with ``m~`` in place of m; the stored ``exp_avg`` stays m.
    With kappa=0 it is exactly :class:`torch.optim.AdamW`.

    Takes every argument of :class:`torch.optim.AdamW` plus:

    Args:
        topc: how many past momenta each parameter tensor keeps (C), int >= 1; default 5.
        decay: factor every stored priority is multiplied by once per step, 0 < decay <= 1.
        kappa: weight of the memory, finite >= 0; 0 is exactly AdamW.
        key: ``"group"`` (one priority per param group: the sum of its tensors' gradient norms)
            or ``"tensor"`` (each tensor's own gradient norm).
        buffer_dtype: dtype of the stored momenta: None (the parameter's), bf16, fp16 or fp32.
        executor: ``"auto"`` (default), ``"torch"``, ``"cpu"`` or ``"triton"``, as for
            :class:`MemoryAugmentedAdamW`; the "cpu" kernel has a Critical Momenta loop.
        save_memory: False leaves the memory out of ``state_dict()``.
        aggregation: not an argument of Critical Momenta (its aggregation is fixed); anything but
            None is a ``ValueError``.
    """

    _base_update = CRITICAL_MOMENTA

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
        topc: int = 5,
        decay: float = MemoryConfig.decay,
        kappa: float = MemoryConfig.kappa,
        key: str = MemoryConfig.key,
        buffer_dtype: torch.dtype | str | None = None,
        executor: str = "auto",
        save_memory: bool = True,
        aggregation: None = None,
    ) -> None:
        if aggregation is not None:
            raise ValueError(
                f"aggregation: CriticalMomentaAdamW has no aggregation argument (its memory is aggregated as "
                f"m + kappa*S/n, SPEC 1b); got aggregation={aggregation!r}. Use MemoryAugmentedAdamW for the "
                "gradient memory's 'mean'/'sum'/'mid'"
            )
        self._setup_memory(MemoryConfig(topc, decay, kappa, CM_AGGREGATION, key, buffer_dtype), executor, save_memory)
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`; an ``aggregation`` entry is a ``ValueError``."""
        if param_group.get("aggregation", CM_AGGREGATION) != CM_AGGREGATION:
            raise ValueError(
                f"aggregation: a CriticalMomentaAdamW param group has no aggregation (fixed to m + kappa*S/n, "
                f"SPEC 1b); got aggregation={param_group['aggregation']!r}"
            )
        super().add_param_group(param_group)
