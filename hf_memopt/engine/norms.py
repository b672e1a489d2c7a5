"""Local squared norms (and largest absolute values) of a batch of gradient views (SPEC section 1, step 1).

One batched computation per device, reduced in fp64. Contiguous fp32 CPU tensors take the CPU
kernel's pass (fixed 16K-element chunks summed in chunk order: independent of the thread count,
and the reduction every CPU executor shares, so their priorities agree bit for bit); other tensors
take ``torch._foreach_norm`` in fp64, whose reduction order is torch's (priorities then agree with
the CPU kernel's to the last bit or so, and decisions are the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _kernel_takes(views: Sequence[Tensor]) -> bool:
    if not all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in views):
        return False
    from .executors import cpu_kernel

    return cpu_kernel.load() is not None


def _max_dtype(views: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the largest ``|x|``: fp32 (exact for every narrower float dtype), fp64 when a view is fp64
    (its values may lie beyond fp32's range, and a norm may not narrow its input)."""
    return torch.float64 if any(g.dtype == torch.float64 for g in views) else torch.float32


def local_sq_norms(views: Sequence[Tensor], with_max: bool = False) -> tuple[Tensor, Tensor | None]:
    """fp64 squared L2 norms of ``views`` and, ``with_max``, their largest ``|x|`` (else None): fp32, or fp64 when
    a view is fp64 (:func:`_max_dtype`); both exact, the maximum is not rounded.

    On one device the results stay there (no transfer yet); views spread over several devices
    get theirs gathered on the CPU.
    """
    if not views:
        return torch.zeros(0, dtype=torch.float64), (torch.zeros(0) if with_max else None)
    if _kernel_takes(views):
        from .executors import cpu_kernel

        ptrs = np.array([g.data_ptr() for g in views], dtype=np.int64)
        numels = np.array([g.numel() for g in views], dtype=np.int64)
        sq, mx = cpu_kernel.sq_norms(ptrs, numels, cpu_kernel.kernel_threads(), with_max)
        return torch.from_numpy(sq), (torch.from_numpy(mx) if mx is not None else None)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(views):
        by_device.setdefault(g.device, []).append(i)
    if len(by_device) == 1:
        return _foreach_sq_max(list(views), with_max)
    sq = torch.empty(len(views), dtype=torch.float64)
    mx = torch.empty(len(views), dtype=_max_dtype(views)) if with_max else None
    for idx in by_device.values():
        part_sq, part_max = _foreach_sq_max([views[i] for i in idx], with_max)
        sq[idx] = part_sq.cpu()
        if mx is not None and part_max is not None:
            mx[idx] = part_max.cpu()
    return sq, mx


def _foreach_sq_max(views: list[Tensor], with_max: bool) -> tuple[Tensor, Tensor | None]:
    sq = torch.stack(torch._foreach_norm(views, 2, dtype=torch.float64)).square_()
    if not with_max:
        return sq, None
    return sq, torch.stack(torch._foreach_norm(views, float("inf"), dtype=_max_dtype(views)))
