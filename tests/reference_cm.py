"""A slow, literal implementation of SPEC section 1b (Critical Momenta), written from the spec and not
from hf_memopt.

Per parameter it keeps a Python list of stored ``(momentum, priority)`` pairs and recomputes the sum
of the stored momenta from scratch every step (fp64). The AdamW arithmetic is torch's single-tensor
AdamW written out op by op (the order the spec gives: decoupled decay, lerp of m, then v and p from
m~), so with an empty memory a step is AdamW's with ``m^2`` in v. kappa=0 is the memory off: the
step is ``torch.optim.AdamW``'s (SPEC 1b: "kappa = 0 is exactly torch.optim.AdamW").
"""

from __future__ import annotations

import math

import torch


class ReferenceCriticalMomenta:
    """SPEC 1b over ``params`` (one param group)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        topc: int,
        decay: float,
        kappa: float,
        key: str,
        buffer_dtype: torch.dtype | None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        self.params = params
        self.topc, self.decay, self.kappa, self.key, self.buffer_dtype = topc, decay, kappa, key, buffer_dtype
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.maximize = amsgrad, maximize
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]
        self.t = [0] * len(params)
        self.slots: list[list[list]] = [[] for _ in params]  # per param: [value, fp32 priority]
        if kappa == 0:
            self.adamw = torch.optim.AdamW(
                params,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                foreach=False,
            )

    @torch.no_grad()
    def step(self) -> None:
        if self.kappa == 0:
            self.adamw.step()
            return
        beta1, beta2 = self.betas
        grads = [p.grad for p in self.params]
        # 1. k from the raw g: fp64 norms, the group's sum over tensors with a gradient, rounded to fp32
        norms = [torch.linalg.vector_norm(g.double()) if g is not None else None for g in grads]
        group_k = sum((n for n in norms if n is not None), torch.zeros((), dtype=torch.float64))
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue  # takes no part: no admission, no decay
            k = (group_k if self.key == "group" else norms[i]).float()
            if self.maximize:
                g = -g
            self.t[i] += 1
            # 2. decoupled decay, then m <- lerp(m, g, 1 - beta1)
            p.mul_(1 - self.lr * self.wd)
            m = self.m[i]
            m.lerp_(g, 1 - beta1)
            # 3. m~ from the memory as it stood before this step
            mem = self.slots[i]
            n = len(mem)
            if n == 0:
                m_tilde = m.clone()
            else:
                s = torch.stack([value.double() for value, _ in mem]).sum(0)
                m_tilde = (m.double() + self.kappa * s / n).to(m.dtype)
            # 4. admission of m (cast to buffer_dtype) with priority k, section 1's rule
            stored = m.to(self.buffer_dtype or m.dtype).clone()
            if math.isfinite(k.item()) and bool(torch.isfinite(stored).all()):
                if n < self.topc:
                    mem.append([stored, k.clone()])
                else:
                    pri = [priority.item() for _, priority in mem]
                    j = min(range(n), key=lambda idx: (pri[idx], idx))  # the true minimum, lowest slot on ties
                    if k.item() > pri[j]:
                        mem[j] = [stored, k.clone()]
            # 5. v from m~^2, p from m~ (AdamW's bias corrections); exp_avg stays m
            v = self.v[i]
            v.mul_(beta2).addcmul_(m_tilde, m_tilde, value=1 - beta2)
            if self.amsgrad:
                torch.maximum(self.vmax[i], v, out=self.vmax[i])
                v = self.vmax[i]
            step = self.t[i]
            denom = (v.sqrt() / ((1 - beta2**step) ** 0.5)).add_(self.eps)
            p.addcdiv_(m_tilde, denom, value=-(self.lr / (1 - beta1**step)))
            # 6. every stored priority of p is multiplied by decay
            for slot in mem:
                slot[1] = slot[1] * torch.tensor(self.decay, dtype=torch.float32)

    def stored(self, i: int) -> list[tuple[torch.Tensor, float]]:
        """The stored momenta of parameter ``i`` with their current priorities."""
        return [(value, priority.item()) for value, priority in self.slots[i]]
