"""The step rule of SPEC section 1, stated once, for a batch of units (numpy, on the host).

Read it next to SPEC section 1. For every unit that has a gradient g in this step:

1. :func:`priorities`  -- k, the unit's own norm or its group's sum of norms (``key``);
2. :func:`coefficients` -- a = coef_g * g + coef_s * S, from the memory as it stood;
3. :func:`decide`      -- admission: fill, evict the true minimum (strictly greater, lowest slot on
   ties) or nothing; non-finite k, or a g that is not finite in ``buffer_dtype``, is never stored;
4. (the base optimizer's update on a: not the rule's business);
5. :func:`commit`      -- record the admission and multiply every stored priority by ``decay``.

The "torch" executor and the host-decision mode of the "cpu" executor run exactly these
functions. Two executors carry transcriptions of :func:`coefficients`, :func:`decide` and
:func:`commit`: the whole-step C kernel (``executors/memopt_cpu.c``, ``memopt_adam_fused``) and the
Triton kernels (``executors/triton_kernels.py``, decisions on the device); ``tests/test_rule_matrix.py``
holds all three to the slow reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import MemoryConfig
from .state import Ledger

#: S is recomputed exactly from the slots every this many steps of a unit's clock (the "refresh"),
#: so the rounding of the running ``S += stored - evicted`` cannot drift.
REFRESH_INTERVAL = 128
#: norms are fp64 sums of squares over fixed chunks of this many elements, added in chunk order (the C
#: kernel, Triton and the "torch" executor's CPU norms alike), so that priorities agree bit for bit
CHUNK = 16384

MODE_NONE, MODE_FILL, MODE_EVICT = 0, 1, 2


@dataclass
class Decisions:
    """The decisions of several units of one param group, as arrays aligned with the units."""

    coef_g: np.ndarray  # float64 [U]: a = coef_g * g + coef_s * S
    coef_s: np.ndarray  # float64 [U]
    mode: np.ndarray  # int64 [U]: MODE_NONE / MODE_FILL / MODE_EVICT
    slot: np.ndarray  # int64 [U]: slot written, -1 where nothing is written
    priority: np.ndarray  # float32 [U]: k rounded to fp32
    refresh: np.ndarray  # bool [U]: rebuild S exactly from the slots after this step's admission
    count_after: np.ndarray  # int64 [U]: filled slots after the admission
    clock_after: np.ndarray  # int64 [U]


def priorities(norms: np.ndarray, groups: np.ndarray, has_grad: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Step 1: per-unit fp64 priority, the unit's own norm (``key="tensor"``) or its group's sum of norms.

    ``groups[u]``: the param-group index of unit ``u``; ``key[u]``: True for ``"group"``. A group's sum
    runs, in unit order, over the units that have a gradient.
    """
    k = norms.copy()
    if key.any():
        sums = np.zeros(int(groups.max()) + 1, dtype=np.float64)
        np.add.at(sums, groups, np.where(has_grad, norms, 0.0))
        k = np.where(key.astype(bool), sums[groups], k)
    return k


def coefficients(n: np.ndarray, kappa: float, aggregation: str) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: ``(coef_g, coef_s)`` in fp64 for units holding ``n`` stored gradients (a = g where n = 0)."""
    nf = n.astype(np.float64)
    safe_n = np.maximum(nf, 1.0)
    if aggregation == "mean":  # (g + kappa S) / (1 + kappa n)
        cg = 1.0 / (1.0 + kappa * nf)
        cs = kappa * cg
    elif aggregation == "sum":  # g + kappa S / n
        cg = np.ones_like(nf)
        cs = kappa / safe_n
    else:  # mid: (g + kappa S / n) / (1 + kappa)
        cg = np.full_like(nf, 1.0 / (1.0 + kappa))
        cs = kappa / (safe_n * (1.0 + kappa))
    empty = n == 0
    return np.where(empty, 1.0, cg), np.where(empty, 0.0, cs)


def finite_in(max_abs: np.ndarray, buffer_dtype: torch.dtype) -> np.ndarray:
    """Whether g cast to ``buffer_dtype`` is finite, from the largest ``|g|`` (casts are monotone).

    ``max_abs`` is fp32 or fp64 (fp64 gradients); it is cast in one rounding, as the store casts g.
    """
    values = np.ascontiguousarray(max_abs)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float32)
    return torch.from_numpy(values).to(buffer_dtype).isfinite().numpy()


def decide(
    pri: np.ndarray,
    count: np.ndarray,
    clock: np.ndarray,
    k: np.ndarray,
    cfg: MemoryConfig,
    castable: np.ndarray | None = None,
) -> Decisions:
    """Steps 2-3 for units that have a gradient: aggregation coefficients and admission.

    ``pri`` [U, C], ``count`` [U], ``clock`` [U]: the units' ledger rows as they stand; ``k``: their
    fp64 priorities this step; ``castable``: False where g is not finite in the buffer dtype (None: all
    are; see :func:`finite_in`).
    """
    n = count
    cg, cs = coefficients(n, cfg.kappa, cfg.aggregation)
    with np.errstate(over="ignore"):  # past fp32's range k becomes inf: not stored, as SPEC says
        k32 = k.astype(np.float32)  # reduced in fp64, rounded to fp32 before the finiteness test
    storable = np.isfinite(k32)
    if castable is not None:
        storable &= castable
    fill = storable & (n < cfg.topc)
    rows = np.arange(len(n))
    j = np.argmin(pri, axis=1) if pri.shape[0] else np.zeros(0, dtype=np.int64)  # the lowest slot on ties
    evict = storable & (n >= cfg.topc) & (k32 > pri[rows, j])  # strictly greater than the true minimum
    mode = np.where(fill, MODE_FILL, np.where(evict, MODE_EVICT, MODE_NONE)).astype(np.int64)
    slot = np.where(fill, n, np.where(evict, j, -1)).astype(np.int64)
    count_after = n + fill
    clock_after = clock + 1
    refresh = (count_after > 0) & (clock_after % REFRESH_INTERVAL == 0)
    return Decisions(cg, cs, mode, slot, k32, refresh, count_after, clock_after)


def commit(rows: Sequence[tuple[Ledger, int]], pri: np.ndarray, at: np.ndarray, d: Decisions, decay: float) -> None:
    """Step 5: record the admissions in the ledgers and age every stored priority (this step's included).

    ``pri`` and ``at`` are the arrays :func:`hf_memopt.engine.state.gather` returned for ``rows``
    (updated in place, then written back).
    """
    idx = np.flatnonzero(d.mode != MODE_NONE)
    pri[idx, d.slot[idx]] = d.priority[idx]
    at[idx, d.slot[idx]] = d.clock_after[idx]
    filled = np.arange(pri.shape[1]) < d.count_after[:, None]
    np.multiply(pri, np.float32(decay), out=pri, where=filled)
    for i, (led, u) in enumerate(rows):
        led.priorities[u] = pri[i]
        led.stored_at[u] = at[i]
        led.count[u] = d.count_after[i]
        led.clock[u] = d.clock_after[i]
