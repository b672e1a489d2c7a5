"""The "torch" executor: portable torch ops on any device, multi-tensor.

Decisions come from the host plan (:mod:`hf_memopt.engine.plan`: one batched norm pass, one
transfer). The memory's part of the step is then a fixed handful of ``torch._foreach_*`` calls over
every unit of every group it runs (per kind of tensor: fp32 or not, DTensor local shards are plain
tensors here), however many tensors there are:

* aggregate ``a = coef_g * g + coef_s * S`` into one new tensor per tensor (the only gradient-sized
  temporary), only for units whose memory is not empty;
* admit: ``S -= evicted``, ``slot <- g`` (cast to the buffer dtype), ``S += slot``;
* refresh (every 128 steps of a unit's clock): ``S`` rebuilt from its slots, one add per slot index.

The decisions are then committed to the ledgers, and the base optimizer's own update (torch's fused,
foreach or for-loop kernel, as the group asks) runs on the aggregates. Critical Momenta (SPEC 1b; its update strategy has ``stores_momentum``) runs
the same memory ops on the momenta instead of the gradients: :meth:`TorchExecutor.prepare` advances
m before the decisions (so the castability test reads the m that is stored), the aggregate is
``m~ = m + (kappa / n) S``, m is admitted, and the strategy's ``finish`` updates v and p from m~,
all multi-tensor. Priorities come from :func:`hf_memopt.engine.norms.local_sq_norms`: on CPU
fp32 tensors they are the CPU kernel's fixed-order fp64 sums (bit-identical to the "cpu" executor),
elsewhere ``torch._foreach_norm`` in fp64 (equal decisions; priorities may differ in the last bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import rule
from .. import state as st


class TorchExecutor:
    """Runs any param group with torch ops (see the module docstring)."""

    name = "torch"

    def decides_on_host(self, opt: Any, work: Any) -> bool:
        """Always: decisions come from the host plan."""
        return True

    def unavailable(self, opt: Any, work: Any) -> str | None:
        """Why this executor cannot run ``work`` (None: it can): only a capturable group with the memory on,
        whose decisions must stay on the device."""
        if work.cfg.kappa > 0.0 and work.group.get("capturable"):
            return "capturable=True with the memory on needs decisions on the device: executor='triton'"
        return None

    def prepare(self, opt: Any, works: Sequence[Any]) -> None:
        """Before the decisions: Critical Momenta advances its momenta (step, decoupled decay, lerp of m),
        so that what the plan tests for castability is the m that will be stored (SPEC 1b.2, 1b.4)."""
        for w in works:
            if w.update.stores_momentum:
                w.update.advance(w.group, w.lists)
                w.admit = w.lists[w.update.memory_source]

    def run(self, opt: Any, works: Sequence[Any]) -> None:
        """Aggregate, admit and update every work (its ``plan`` holds the decisions; None: no memory)."""
        memory = [w for w in works if w.plan is not None]
        aggregates = _memory_step(opt, memory) if memory else {}
        for w in memory:  # before the base update: one that raises leaves slots, S and ledger agreeing
            commit(opt, w)
        for w in works:
            if id(w) in aggregates and w.update.stores_momentum:
                w.update.finish(w.group, w.lists, aggregates[id(w)])  # v and p from m~ (SPEC 1b.5)
                continue
            lists = w.lists
            if id(w) in aggregates:
                lists = dict(lists, grads=aggregates[id(w)])
            w.update.update(opt, w.group, lists, w.extra)


class _Batch:
    """Parallel lists for one multi-tensor aggregation ``a = cg * a + cs * S``."""

    def __init__(self) -> None:
        self.a: list[Tensor] = []
        self.s: list[Tensor] = []
        self.cg: list[float] = []
        self.cs: list[float] = []

    def add(self, a: Tensor, s: Tensor, cg: float, cs: float) -> None:
        self.a.append(a)
        self.s.append(s)
        self.cg.append(cg)
        self.cs.append(cs)


def _memory_step(opt: Any, works: Sequence[Any]) -> dict[int, list[Tensor]]:
    """Aggregate and admit for every unit of ``works``; returns the aggregated gradient lists by work."""
    fresh = _Batch()  # whole fp32 gradients: the aggregates are new tensors
    fresh_to: list[tuple[list[Tensor], int, Tensor]] = []  # where each goes: (aggregates, index, gradient)
    in_place = _Batch()  # fp32 work tensors (upcast copies, segments of a copy) aggregated in place
    cast_back: list[tuple[list[Tensor] | None, int, Tensor, Tensor]] = []  # (aggregates, index, target, fp32)
    evict_s: list[Tensor] = []
    evict_old: list[Tensor] = []
    store_slot: list[Tensor] = []
    store_g: list[Tensor] = []
    add_s: list[Tensor] = []
    add_slot: list[Tensor] = []
    refresh: list[tuple[Tensor, list[Tensor]]] = []
    out: dict[int, list[Tensor]] = {}
    for w in works:
        plan, cfg = w.plan, w.cfg
        d = plan.d
        # what is aggregated and stored: the gradients, or the momenta under Critical Momenta
        grads = w.lists[w.update.memory_source]
        aggregates = list(grads)
        cg, cs = d.coef_g.tolist(), d.coef_s.tolist()
        modes, slots, refreshes, counts = d.mode.tolist(), d.slot.tolist(), d.refresh.tolist(), d.count_after.tolist()
        slot_keys = st.slot_keys(cfg.topc)
        copies: dict[int, Tensor] = {}  # list index -> local copy of a segmented tensor's gradient
        for j, (p, i, si, start) in enumerate(plan.units):
            state = plan.states[j]
            g = grads[i]
            whole = start < 0
            numel = -1 if whole else opt._engine.segments[id(p)][si][1]
            g_view = st.unit_view(g, start, numel, whole)
            s_view = st.unit_view(state["memory_sum"], start, numel, whole)
            if cg[j] != 1.0 or cs[j] != 0.0:
                if not whole:
                    # a segment: aggregated in place in a copy of the whole flat gradient, whose other
                    # elements (other segments, DeepSpeed's padding) keep the plain gradient
                    if i not in copies:
                        copies[i] = st.local_tensor(g).clone()
                        aggregates[i] = _like(g, copies[i])
                    target = st.unit_view(copies[i], start, numel, False)
                    if target.dtype == torch.float32:
                        in_place.add(target, s_view, cg[j], cs[j])
                    else:
                        a32 = target.to(torch.float32)
                        in_place.add(a32, s_view, cg[j], cs[j])
                        cast_back.append((None, -1, target, a32))
                elif g_view.dtype == torch.float32:
                    fresh.add(g_view, s_view, cg[j], cs[j])
                    fresh_to.append((aggregates, i, g))
                else:
                    a32 = g_view.to(torch.float32)
                    in_place.add(a32, s_view, cg[j], cs[j])
                    cast_back.append((aggregates, i, g, a32))
            if modes[j] != rule.MODE_NONE:
                slot = st.unit_view(state[slot_keys[slots[j]]], start, numel, whole)
                store_slot.append(slot)
                store_g.append(g_view)
                if not refreshes[j]:
                    if modes[j] == rule.MODE_EVICT:
                        evict_s.append(s_view)
                        evict_old.append(slot)
                    add_s.append(s_view)
                    add_slot.append(slot)
            if refreshes[j]:
                refresh.append((s_view, [st.unit_view(state[k], start, numel, whole) for k in slot_keys[: counts[j]]]))
        out[id(w)] = aggregates

    # 1. aggregate, from S as it stood before this step's admissions
    if fresh.a:
        new = list(torch._foreach_mul(fresh.a, fresh.cg))  # the one gradient-sized temporary per tensor
        for (aggregates, i, g), a in zip(fresh_to, new):
            aggregates[i] = _like(g, a)
        _add_scaled(new, fresh)
    if in_place.a:
        torch._foreach_mul_(in_place.a, in_place.cg)
        _add_scaled(in_place.a, in_place)
    for aggregates, i, target, a32 in cast_back:
        if aggregates is None:
            target.copy_(a32)  # back into the lower-precision copy of a segmented gradient
        else:
            aggregates[i] = _like(target, a32.to(target.dtype))
    # 2. admit: S -= evicted, slot <- g (cast to the buffer dtype), S += slot
    if evict_s:
        torch._foreach_sub_(evict_s, evict_old)
    if store_slot:
        torch._foreach_copy_(store_slot, store_g)
    if add_s:
        torch._foreach_add_(add_s, add_slot)
    # 3. refresh: S rebuilt exactly from the filled slots, in slot order
    if refresh:
        torch._foreach_copy_([s for s, _ in refresh], [slots[0] for _, slots in refresh])
        for index in range(1, max(len(slots) for _, slots in refresh)):
            pairs = [(s, slots[index]) for s, slots in refresh if len(slots) > index]
            torch._foreach_add_([s for s, _ in pairs], [v for _, v in pairs])
    return out


def commit(opt: Any, w: Any) -> None:
    """Commit ``w``'s host decisions to its ledgers (admissions recorded, priorities decayed) and count them."""
    w.plan.commit(w.cfg)
    opt._engine.stats.record(w.plan.d.mode)


def _add_scaled(a: list[Tensor], batch: _Batch) -> None:
    """``a += cs * S`` without a second temporary: one ``add_(alpha=cs)`` per distinct cs.

    cs depends only on a unit's count of stored gradients (and its group's kappa and aggregation),
    so there are at most ``topc`` distinct values per group, however many tensors there are. (On CPU
    ``add_`` with ``alpha`` is a fused multiply-add; the C kernel rounds ``cs * S`` first: the
    aggregates agree to the last bit or so, the memory itself exactly.)
    """
    by_cs: dict[float, list[int]] = {}
    for j, cs in enumerate(batch.cs):
        by_cs.setdefault(cs, []).append(j)
    for cs, idx in by_cs.items():
        torch._foreach_add_([a[j] for j in idx], [batch.s[j] for j in idx], alpha=cs)


def _like(g: Tensor, local: Tensor) -> Tensor:
    """``local`` as the same kind of tensor as ``g`` (a DTensor with g's layout, or plain)."""
    if local is g or not hasattr(g, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, g.device_mesh, g.placements, run_check=False, shape=g.shape, stride=g.stride())
