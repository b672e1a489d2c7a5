"""Random gradient streams shared by the core tests."""

from __future__ import annotations

import torch

SHAPES = [(7, 5), (5,), (3, 4, 2), (11,)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def gradient_stream(steps: int, dtype: torch.dtype = torch.float32, seed: int = 1, skip_every: int = 3, shapes=SHAPES):
    """Per step, one gradient (or None) per parameter: norms spread over six orders of magnitude,
    and the last tensor misses its gradient every ``skip_every`` steps (0: never)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads = []
        for i, s in enumerate(shapes):
            scale = 10 ** (torch.rand((), generator=gen).item() * 6 - 3)
            g = (torch.randn(s, generator=gen) * scale).to(dtype)
            grads.append(None if (skip_every and i == len(shapes) - 1 and t % skip_every == 1) else g)
        yield grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def lockstep(stream, *runs: tuple[object, list[torch.Tensor]]):
    """Step every ``(optimizer, params)`` run on the same gradients, one step at a time; yields each step's
    index and gradients after all runs took it, so a test can compare them between steps."""
    for t, grads in enumerate(stream):
        for opt, params in runs:
            set_grads(params, grads)
            opt.step()
        yield t, grads


def step_all(stream, *runs: tuple[object, list[torch.Tensor]]) -> None:
    """:func:`lockstep` to the end of ``stream``."""
    for _ in lockstep(stream, *runs):
        pass
