"""The critical-gradient memory engine (SPEC sections 1 and 3).

Knows tensors, priorities and slots; nothing of the base optimizers (they only see
the aggregated gradient) and nothing of distribution backends (they plug in through
:class:`NormReducer` and per-parameter segments).

Layout of one parameter's memory in ``optimizer.state[p]``:

* ``memory_0`` ... ``memory_{C-1}``: stored gradients, shaped like ``p``, ``buffer_dtype``;
* ``priority_0`` ... ``priority_{C-1}``: fp32 priorities, ``stored_at_0`` ... : the value of
  ``memory_clock`` when the slot was written (for ``memory_stats``' age);
* ``memory_sum``: fp32 running sum ``S`` of the stored gradients;
* ``memory_count``: how many slots are filled (slots fill in order, so slot ``i`` is in use
  iff ``i < memory_count``); ``memory_clock``: steps this tensor took part in.

The per-slot scalars are 0-dim CPU tensors that are views into one small table per
parameter; the host takes the admission decisions on that table through numpy, so the
state is always current and a step needs a single device-to-host transfer (the norms).
A parameter bound to several *segments* (a flat ZeRO partition holding slices of several
model tensors) keeps one row of scalars per segment; the scalars are then 1-D.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import MemoryConfig

#: ``memory_sum`` is recomputed exactly from the slots every this many steps of a tensor,
#: so the rounding of the running ``S += stored - evicted`` cannot drift.
REFRESH_INTERVAL = 128

MODE_NONE, MODE_FILL, MODE_EVICT = 0, 1, 2

_SCALAR_KEYS = ("priority_", "stored_at_")
_FIXED_KEYS = ("memory_sum", "memory_count", "memory_clock")


def is_memory_key(key: Any) -> bool:
    """True for the state keys owned by the memory (not by the base optimizer)."""
    if not isinstance(key, str):
        return False
    return key in _FIXED_KEYS or key.startswith(("memory_", "priority_", "stored_at_"))


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` held by this process (a DTensor's local shard, else ``t``)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class NormReducer(Protocol):
    """Turns per-unit local squared norms into full-tensor norms, identically on every rank.

    ``units`` lists ``(param, segment_index)`` for every unit of every memory-enabled
    parameter in a fixed order (units without a gradient on this rank contribute 0).
    Returns fp64 squared norms of the full tensors, one per unit.
    """

    def __call__(self, units: Sequence[tuple[Tensor, int]], local_sq: Tensor) -> Tensor: ...


@dataclass
class Ledger:
    """Host view (numpy, sharing memory with the state's CPU tensors) of one parameter's scalars."""

    priorities: np.ndarray  # [U, C] float32
    stored_at: np.ndarray  # [U, C] int64
    count: np.ndarray  # [U] int64
    clock: np.ndarray  # [U] int64
    anchor: Tensor  # the state tensor the views belong to: a load replaces it, forcing a rebind


@dataclass
class UnitDecision:
    """What one unit (a tensor, or a segment of one) does in this step."""

    coef_g: float  # aggregate a = coef_g * g + coef_s * S
    coef_s: float
    mode: int  # MODE_NONE / MODE_FILL / MODE_EVICT
    slot: int  # slot written (FILL/EVICT), else -1
    priority: float  # k, already rounded to fp32
    refresh: bool  # recompute S exactly from the slots after this step's admission
    count_after: int  # filled slots after the admission


@dataclass
class Decisions:
    """The decisions of several units of one param group, as arrays aligned with the units."""

    coef_g: np.ndarray  # float64 [U]
    coef_s: np.ndarray  # float64 [U]
    mode: np.ndarray  # int64 [U]
    slot: np.ndarray  # int64 [U], -1 where nothing is written
    priority: np.ndarray  # float32 [U]
    refresh: np.ndarray  # bool [U]
    count_after: np.ndarray  # int64 [U]
    clock_after: np.ndarray  # int64 [U]

    def unit(self, i: int) -> UnitDecision:
        return UnitDecision(
            float(self.coef_g[i]),
            float(self.coef_s[i]),
            int(self.mode[i]),
            int(self.slot[i]),
            float(self.priority[i]),
            bool(self.refresh[i]),
            int(self.count_after[i]),
        )


def segments_of(p: Tensor, bounds: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """``(start, numel)`` of each unit of ``p`` (one unit covering the whole local tensor by default)."""
    if bounds:
        return list(bounds)
    return [(0, local_tensor(p).numel())]


def unit_view(t: Tensor, start: int, numel: int, whole: bool) -> Tensor:
    """The unit's elements of a parameter-shaped tensor (``t`` itself for a whole-tensor unit)."""
    t = local_tensor(t)
    return t if whole else t.view(-1).narrow(0, start, numel)


def _scalar_view(table: Tensor, i: int, units: int) -> Tensor:
    return table[0, i] if units == 1 else table[:, i]


def _vector_view(vec: Tensor, units: int) -> Tensor:
    return vec[0] if units == 1 else vec


def init_state(p: Tensor, state: dict[str, Any], cfg: MemoryConfig, units: int) -> None:
    """Allocate the memory keys of ``p`` (lazily, from inside ``step``; never for ``kappa == 0``)."""
    dtype = cfg.buffer_dtype or p.dtype
    for i in range(cfg.topc):
        # zeros_like keeps the parameter's kind: a DTensor slot under FSDP2, a flat shard under ZeRO.
        state[f"memory_{i}"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["memory_sum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    _bind_scalars(
        state,
        torch.zeros(units, cfg.topc, dtype=torch.float32),
        torch.zeros(units, cfg.topc, dtype=torch.int64),
        torch.zeros(units, dtype=torch.int64),
        torch.zeros(units, dtype=torch.int64),
    )


def _bind_scalars(state: dict[str, Any], pri: Tensor, at: Tensor, count: Tensor, clock: Tensor) -> None:
    units, topc = pri.shape
    for i in range(topc):
        state[f"priority_{i}"] = _scalar_view(pri, i, units)
        state[f"stored_at_{i}"] = _scalar_view(at, i, units)
    state["memory_count"] = _vector_view(count, units)
    state["memory_clock"] = _vector_view(clock, units)


def ledger_of(state: dict[str, Any], topc: int, cache: dict[int, Ledger]) -> Ledger:
    """The numpy ledger of a parameter's state, rebuilt when the state tensors were replaced (a load)."""
    anchor = state["priority_0"]
    led = cache.get(id(anchor))
    if led is not None and led.anchor is anchor:
        return led
    units = 1 if anchor.dim() == 0 else anchor.shape[0]
    # Gather (copy) whatever the state holds into fresh tables, then make the state views of them.
    pri = torch.stack([state[f"priority_{i}"].detach().to("cpu", torch.float32).reshape(units) for i in range(topc)], 1)
    at = torch.stack([state[f"stored_at_{i}"].detach().to("cpu", torch.int64).reshape(units) for i in range(topc)], 1)
    count = state["memory_count"].detach().to("cpu", torch.int64).reshape(units).clone()
    clock = state["memory_clock"].detach().to("cpu", torch.int64).reshape(units).clone()
    _bind_scalars(state, pri, at, count, clock)
    led = Ledger(pri.numpy(), at.numpy(), count.numpy(), clock.numpy(), state["priority_0"])
    cache.pop(id(anchor), None)
    cache[id(led.anchor)] = led
    return led


def gather(rows: Sequence[tuple[Ledger, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Priorities [U, C], stored_at [U, C], count [U] and clock [U] of the given (ledger, unit) rows."""
    pri = np.stack([led.priorities[u] for led, u in rows])
    at = np.stack([led.stored_at[u] for led, u in rows])
    count = np.array([led.count[u] for led, u in rows], dtype=np.int64)
    clock = np.array([led.clock[u] for led, u in rows], dtype=np.int64)
    return pri, at, count, clock


def decide(pri: np.ndarray, count: np.ndarray, clock: np.ndarray, k: np.ndarray, cfg: MemoryConfig) -> Decisions:
    """Aggregation coefficients and admission decisions of units that have a gradient (SPEC section 1, steps 2-3).

    ``pri``/``count``/``clock`` are the units' ledger rows as they stand (see :func:`gather`); ``k``
    their fp64 priorities this step. The arithmetic is fp64 per unit, as a scalar formula would be.
    """
    n = count
    kappa = cfg.kappa
    nf = n.astype(np.float64)
    safe_n = np.maximum(nf, 1.0)
    if cfg.aggregation == "mean":
        cg = 1.0 / (1.0 + kappa * nf)
        cs = kappa * cg
    elif cfg.aggregation == "sum":
        cg = np.ones_like(nf)
        cs = kappa / safe_n
    else:  # mid
        cg = np.full_like(nf, 1.0 / (1.0 + kappa))
        cs = kappa / (safe_n * (1.0 + kappa))
    empty = n == 0
    cg = np.where(empty, 1.0, cg)
    cs = np.where(empty, 0.0, cs)
    k32 = k.astype(np.float32)
    finite = np.isfinite(k32)
    fill = finite & (n < cfg.topc)
    rows = np.arange(len(n))
    j = np.argmin(pri, axis=1) if pri.shape[0] else np.zeros(0, dtype=np.int64)  # first index on ties
    # strictly greater than the true minimum
    evict = finite & (n >= cfg.topc) & (k32 > pri[rows, j])
    mode = np.where(fill, MODE_FILL, np.where(evict, MODE_EVICT, MODE_NONE)).astype(np.int64)
    slot = np.where(fill, n, np.where(evict, j, -1)).astype(np.int64)
    count_after = n + fill
    clock_after = clock + 1
    refresh = (count_after > 0) & (clock_after % REFRESH_INTERVAL == 0)
    return Decisions(cg, cs, mode, slot, k32, refresh, count_after, clock_after)


def commit(rows: Sequence[tuple[Ledger, int]], pri: np.ndarray, at: np.ndarray, d: Decisions, decay: float) -> None:
    """Record the decisions in the ledgers and age the priorities (SPEC section 1, step 5).

    ``pri`` and ``at`` are the arrays :func:`gather` returned for ``rows`` (updated in place).
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


def aggregate(g: Tensor, s: Tensor, d: UnitDecision, out_dtype: torch.dtype) -> Tensor:
    """``a = coef_g * g + coef_s * S`` in fp32, returned in ``out_dtype`` (``g`` itself when a = g)."""
    if d.coef_s == 0.0 and d.coef_g == 1.0:
        return g
    a = torch.mul(g, d.coef_g) if g.dtype == torch.float32 else g.to(torch.float32).mul_(d.coef_g)
    a.add_(s, alpha=d.coef_s)
    return a if out_dtype == torch.float32 else a.to(out_dtype)


def admit(g: Tensor, s: Tensor, slots: Sequence[Tensor], d: UnitDecision) -> None:
    """Write ``g`` (cast to the buffer dtype) into the chosen slot and keep ``S`` in step.

    ``slots``, ``s`` and ``g`` are the unit's views.
    """
    if d.mode != MODE_NONE:
        slot = slots[d.slot]
        if d.mode == MODE_EVICT:
            s.sub_(slot)
        slot.copy_(g)
        if not d.refresh:
            s.add_(slot)
    if d.refresh:
        refresh_sum(s, slots, d.count_after)


def refresh_sum(s: Tensor, slots: Sequence[Tensor], count: int) -> None:
    """Recompute ``S`` exactly (fp32, slot order) from the filled slots."""
    s.copy_(slots[0])
    for i in range(1, count):
        s.add_(slots[i])


def batched_sq_norms(grads: Sequence[Tensor]) -> Tensor:
    """fp64 squared L2 norms of ``grads`` (local parts): one batched call per device.

    On one device the result stays there (no transfer yet); a model spread over several
    devices gets its norms gathered on the CPU.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        from . import _kernels  # a parallel pass at memory bandwidth, where torch's norm reaches about half

        if _kernels.load() is not None:
            ptrs = [g.data_ptr() for g in grads]
            numels = [g.numel() for g in grads]
            return torch.from_numpy(_kernels.sq_norms(np.array(ptrs), np.array(numels), torch.get_num_threads()))
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    if len(by_device) == 1:
        return torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32)).to(torch.float64).square()
    out = torch.empty(len(grads), dtype=torch.float64)
    for idx in by_device.values():
        norms = torch.stack(torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float32))
        out[idx] = norms.to("cpu", torch.float64).square()
    return out


def group_priorities(norms: np.ndarray, groups: np.ndarray, has_grad: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Per-unit priority k: the unit's own norm (``key="tensor"``) or its group's sum of norms.

    ``groups[u]`` is the param-group index of unit ``u``; ``key[u]`` is 1 for ``"group"``.
    A group's sum runs over tensors that have a gradient (their norm is 0 otherwise).
    """
    k = norms.copy()
    if key.any():
        sums = np.zeros(int(groups.max()) + 1, dtype=np.float64)
        np.add.at(sums, groups, np.where(has_grad, norms, 0.0))
        k = np.where(key.astype(bool), sums[groups], k)
    return k


# ---------------------------------------------------------------------------------------
# Checkpoints: Optimizer.load_state_dict casts every state tensor to the parameter's dtype
# (lossy for fp32 priorities/sums next to bf16 parameters), so the memory keys are taken out
# before it runs and put back, with their own dtypes, after it.


def split_memory_state(state: dict[Any, dict[Any, Any]]) -> tuple[dict[Any, dict[Any, Any]], dict[Any, dict[str, Any]]]:
    """Split a state_dict's ``state`` into (base keys, memory keys) per param id, without mutating it."""
    base: dict[Any, dict[Any, Any]] = {}
    memory: dict[Any, dict[str, Any]] = {}
    for pid, entry in state.items():
        if not isinstance(entry, dict):
            base[pid] = entry
            continue
        base[pid] = {k: v for k, v in entry.items() if not is_memory_key(k)}
        mem = {k: v for k, v in entry.items() if is_memory_key(k)}
        if mem:
            memory[pid] = mem
    return base, memory


def restore_memory_state(p: Tensor, state: dict[str, Any], saved: dict[str, Any] | None, cfg: MemoryConfig) -> bool:
    """Put a saved memory back into ``state`` with the dtypes and devices of this run.

    Returns False (after a warning) when the checkpoint holds no memory for ``p``.
    Raises ``ValueError`` when it was saved with another ``topc``.
    """
    if not saved:
        return False
    saved_topc = sum(1 for k in saved if isinstance(k, str) and k.startswith("priority_"))
    if saved_topc != cfg.topc:
        raise ValueError(
            f"checkpoint memory was saved with topc={saved_topc}, but the optimizer has topc={cfg.topc}; "
            "load it with the same topc (or start a fresh optimizer)"
        )
    dtype = cfg.buffer_dtype or p.dtype
    for i in range(cfg.topc):
        state[f"memory_{i}"] = _to_like(saved[f"memory_{i}"], p, dtype)
    state["memory_sum"] = _to_like(saved["memory_sum"], p, torch.float32)
    pri = torch.stack([torch.as_tensor(saved[f"priority_{i}"]).reshape(-1) for i in range(cfg.topc)], 1)
    units = pri.shape[0]
    at_vals = [saved.get(f"stored_at_{i}", 0) for i in range(cfg.topc)]
    at = torch.stack([torch.as_tensor(v).reshape(-1).expand(units) for v in at_vals], 1)
    count = torch.as_tensor(saved["memory_count"]).reshape(-1).expand(units)
    clock = torch.as_tensor(saved.get("memory_clock", 0)).reshape(-1).expand(units)
    _bind_scalars(
        state,
        pri.to("cpu", torch.float32).clone(),
        at.to("cpu", torch.int64).clone(),
        count.to("cpu", torch.int64).clone(),
        clock.to("cpu", torch.int64).clone(),
    )
    return True


def _to_like(value: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    if value.dtype == dtype and value.device == p.device:
        return value
    return value.to(device=p.device, dtype=dtype)


def warn_missing_memory(n_params: int) -> None:
    warnings.warn(
        f"the loaded optimizer state has no critical-gradient memory for {n_params} parameter(s) "
        "(e.g. a checkpoint converted by DeepSpeed's universal-checkpoint tool, or saved by another "
        "optimizer); their memory starts empty",
        stacklevel=4,
    )


def topc_of(state: dict[str, Any]) -> int:
    """C of a parameter's memory, from its state (one ``priority_i`` per slot)."""
    return sum(1 for k in state if isinstance(k, str) and k.startswith("priority_"))


def memory_bytes(state: dict[str, Any]) -> int:
    """Bytes held by the memory of one parameter on this process (slots + running sum)."""
    names = ["memory_sum", *(f"memory_{i}" for i in range(topc_of(state)))]
    return sum(local_tensor(state[k]).numel() * local_tensor(state[k]).element_size() for k in names if k in state)
