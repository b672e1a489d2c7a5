"""A slow, literal implementation of SPEC section 1, written from the spec and not from hf_memopt.

It keeps, per parameter, a Python list of stored ``(gradient, priority)`` pairs, recomputes the
sum of the stored gradients from scratch every step (in fp64), and hands the aggregate to
torch's own optimizer as the gradient. Tests run it side by side with hf_memopt's optimizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_BASES = {
    "MemoryAugmentedAdamW": torch.optim.AdamW,
    "MemoryAugmentedAdam": torch.optim.Adam,
    "MemoryAugmentedSGD": torch.optim.SGD,
    "MemoryAugmentedRMSprop": torch.optim.RMSprop,
}


@dataclass
class _Slot:
    value: torch.Tensor  # as stored (buffer dtype)
    priority: torch.Tensor  # fp32 scalar


@dataclass
class _Memory:
    slots: list[_Slot] = field(default_factory=list)


class ReferenceOptimizer:
    """Reference for ``cls_name`` over ``params`` (one param group) with the given hyperparameters."""

    def __init__(
        self,
        cls_name: str,
        params: list[torch.Tensor],
        *,
        topc: int,
        decay: float,
        kappa: float,
        aggregation: str,
        key: str,
        buffer_dtype: torch.dtype | None,
        **base_kwargs: object,
    ) -> None:
        self.params = params
        self.topc, self.decay, self.kappa = topc, decay, kappa
        self.aggregation, self.key, self.buffer_dtype = aggregation, key, buffer_dtype
        self.base = _BASES[cls_name](params, foreach=False, **base_kwargs)
        self.memory = [_Memory() for _ in params]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        # SPEC 1.3: reduced in fp64, rounded to fp32 (the priorities' dtype) before any test
        norms = [torch.linalg.vector_norm(g.double()) if g is not None else None for g in grads]
        if self.key == "group":
            group_k = (
                torch.stack([n for n in norms if n is not None]).sum() if any(n is not None for n in norms) else None
            )
        aggregated = []
        for i, g in enumerate(grads):
            if g is None:
                aggregated.append(None)
                continue
            mem = self.memory[i]
            n = len(mem.slots)
            if n == 0 or self.kappa == 0:
                a = g.double()
            else:
                s = torch.stack([slot.value.double() for slot in mem.slots]).sum(0)
                kap = self.kappa
                if self.aggregation == "mean":
                    a = (g.double() + kap * s) / (1 + kap * n)
                elif self.aggregation == "sum":
                    a = g.double() + kap * s / n
                else:
                    a = (g.double() + kap * s / n) / (1 + kap)
            aggregated.append(a.to(g.dtype))
            if self.kappa > 0:
                k = (group_k if self.key == "group" else norms[i]).float()
                stored = g.to(self.buffer_dtype or g.dtype).clone()
                # a non-finite priority, or a g not finite in the buffer dtype, is never stored
                if math.isfinite(k.item()) and bool(torch.isfinite(stored).all()):
                    if n < self.topc:
                        mem.slots.append(_Slot(stored, k.clone()))
                    else:
                        pri = [slot.priority.item() for slot in mem.slots]
                        j = min(range(n), key=lambda idx: (pri[idx], idx))
                        if k.item() > pri[j]:
                            mem.slots[j] = _Slot(stored, k.clone())
        originals = [p.grad for p in self.params]
        for p, a in zip(self.params, aggregated):
            p.grad = a
        self.base.step()
        for p, g in zip(self.params, originals):
            p.grad = g
        for i, g in enumerate(grads):
            if g is not None:
                for slot in self.memory[i].slots:
                    slot.priority = slot.priority * torch.tensor(self.decay, dtype=torch.float32)

    def stored(self, i: int) -> list[tuple[torch.Tensor, float]]:
        """The stored gradients of parameter ``i`` with their current priorities."""
        return [(slot.value, slot.priority.item()) for slot in self.memory[i].slots]
