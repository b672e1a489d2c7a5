"""What the "triton" executor keeps between steps: the device ledgers and the kernels' tables.

* :class:`DeviceLedger`: one param group's ledger on its device (SPEC 3's scalars are views of its rows);
* :class:`Layout`: one step's units (the param groups' tensors, or segments, that have a gradient),
  their chunk map, the addresses the kernels read (S, slots, Adam's state), the decision buffers; built
  by :func:`build_layout`, cached per optimizer layout and revalidated by identity every step;
* :func:`adam_eligible`: whether a group's Adam/AdamW update can run inside the kernel's pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...config import MemoryConfig
from .. import guard, rule
from .. import state as st
from .triton_runtime import kernels


@functools.cache
def cast_limit(dtype: torch.dtype) -> float:
    """The smallest fp32 magnitude that is not finite once cast to ``dtype`` (inf for fp32 itself)."""
    if dtype == torch.float32:
        return float("inf")
    lo = torch.tensor(torch.finfo(dtype).max, dtype=torch.float32).view(torch.int32).item()
    hi = torch.tensor(float("inf"), dtype=torch.float32).view(torch.int32).item()
    while hi - lo > 1:  # bisect on the bit patterns of positive fp32 values
        mid = (lo + hi) // 2
        if torch.tensor(mid, dtype=torch.int32).view(torch.float32).to(dtype).isinf():
            hi = mid
        else:
            lo = mid
    return torch.tensor(hi, dtype=torch.int32).view(torch.float32).item()


@dataclass(eq=False)
class DeviceLedger:
    """One param group's ledger on its device: every memory unit of the group, one row each."""

    pri: Tensor  # [R, C] float32
    at: Tensor  # [R, C] int64
    count: Tensor  # [R] int64
    clock: Tensor  # [R] int64
    first: dict[int, int]  # id(param) -> its first row

    def snapshot(self) -> st.Ledger:
        """A host copy (numpy), for ``memory_stats()``: the one transfer, when it is called."""
        host = [t.cpu() for t in (self.pri, self.at, self.count, self.clock)]
        return st.Ledger(*(t.numpy() for t in host), binding=None)


@dataclass(eq=False)
class Group:
    index: int  # the param group's index
    work: int  # index into the step's works
    u0: int  # first of its units
    n: int  # its units with a gradient
    ledger: DeviceLedger
    rows: Tensor  # ledger row of each unit
    coef_g: Tensor  # fp32 [topc + 1], by count of stored values
    coef_s: Tensor
    limit: float  # cast_limit of the slot dtype
    topc: int
    decay: float
    key_group: bool


@dataclass(eq=False)
class ChunkClass:
    """The units of one param group with one (g dtype, x dtype, slot dtype): one launch of each per-chunk kernel."""

    g_dtype: torch.dtype
    x_dtype: torch.dtype
    slot_dtype: torch.dtype
    work: int  # the param group (its index in the step's works): one launch per group and dtypes
    chunk0: int
    chunks: int


@dataclass(eq=False)
class Layout:
    """Everything about a step's units that stays put between steps (cached per optimizer layout)."""

    units: list[tuple[int, int, Tensor, int, int, int]]  # (work, list index, param, segment, start or -1, numel)
    classes: list[ChunkClass]
    groups: list[Group]
    chunk_unit: Tensor
    chunk_lo: Tensor
    chunk_hi: Tensor
    unit_chunk0: Tensor
    unit_chunks: Tensor
    unit_s: Tensor  # S pointers
    unit_slots: Tensor  # [U, slot_stride] slot pointers
    slot_stride: int
    unit_a: Tensor  # element offset of each unit's aggregate in its dtype's buffer
    unit_adam: Tensor  # [U, 4]: p, exp_avg, exp_avg_sq, max_exp_avg_sq addresses (0 where not used)
    adam_ready: list[bool]  # per work: its Adam/AdamW update can run in the kernel (see adam_eligible)
    regions: dict[
        tuple[int, int], tuple[torch.dtype, int, bool, int]
    ]  # (work, index) -> (dtype, offset, segmented, numel)
    device: torch.device
    part_sq: Tensor
    part_max: Tensor
    unit_sq: Tensor
    unit_max: Tensor
    dec: dict[str, Tensor]
    same_x: bool  # the stored values are the gradients (not Critical Momenta's momenta)
    reducer_units: list[tuple[Tensor, int]] = field(default_factory=list)
    reducer_pos: Tensor | None = None
    unit_limit: Tensor | None = None
    pointers: dict[str, tuple[bytes, Tensor]] = field(default_factory=dict)
    views: list[Any] = field(default_factory=list)  # each work's state view the tables were built from

    def unit_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per unit: its row in the works' lists laid end to end, and its byte offset in its tensor (so that
        the lists' data pointers, concatenated, give the units' addresses in one numpy expression)."""
        cached = self.pointers.get("unit-rows")
        if cached is None:
            lengths: dict[int, int] = {}
            for wi, i, *_ in self.units:
                lengths[wi] = max(lengths.get(wi, 0), i + 1)
            first = np.cumsum([0] + [lengths[wi] for wi in range(len(lengths))])
            rows = np.array([first[wi] + i for wi, i, *_ in self.units], dtype=np.int64)
            offsets = np.array(
                [max(start, 0) * st.local_tensor(p).element_size() for _wi, _i, p, _s, start, _n in self.units],
                dtype=np.int64,
            )
            cached = self.pointers["unit-rows"] = (rows, offsets)  # type: ignore[assignment]
        return cached  # type: ignore[return-value]

    def valid(self, opt: Any, works: Sequence[Any]) -> bool:
        """Whether the tables still describe the states: the same views (tensors, storages, sizes and group
        flags: :mod:`hf_memopt.engine.guard`) and ledgers (a load or another executor rebinds them; a new
        parameter's first memory rebuilds its group's ledger)."""
        if len(works) != len(self.views) or any(w.view is not v for w, v in zip(works, self.views)):
            return False
        # S and the slots are the views'; the ledger scalars group_ledger checked this step
        for g in self.groups:
            cached = opt._engine.cache.get(("triton-ledger", g.index))
            if cached is None or cached[0] is not g.ledger:
                return False
        return True


def state_reason(opt: Any, w: Any) -> str | None:
    """Why the kernels cannot run ``w``'s state through raw addresses (None: they can): every state tensor
    they read contiguous on the parameters' device, S fp32, the slots of one Triton dtype."""
    device = st.local_tensor(w.lists["params"][0]).device
    for j, p in enumerate(w.lists["params"]):
        state = opt.state[p]
        slots = [st.local_tensor(state[k]) for k in st.slot_keys(w.cfg.topc)]
        s = st.local_tensor(state["memory_sum"])
        bad = [k for k, t in zip(st.slot_keys(w.cfg.topc), slots) if t.dtype != slots[0].dtype]
        bad += [k for k, t in [*zip(st.slot_keys(w.cfg.topc), slots), ("memory_sum", s)] if not t.is_contiguous()]
        if slots[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
            bad.append("memory_0")
        if s.dtype != torch.float32:
            bad.append("memory_sum")
        if any(t.device != device for t in [*slots, s]):
            bad.append("device")
        if bad:
            return (
                f"the memory of parameter {j} ({', '.join(sorted(set(bad)))}) is not laid out as the kernels read it "
                "(contiguous slots of one float dtype and an fp32 S on the parameters' device)"
            )
    return None


def adam_eligible(opt: Any, w: Any) -> bool:
    """Whether the group's Adam/AdamW update can run inside the kernel's pass: torch's default
    implementation choice (no foreach/fused/capturable flag: the kernel stands in for its foreach
    update), numbers for lr and betas, fp32 tensors, CPU step counters, no segments (a flat
    partition's padding needs the plain update)."""
    u = w.update
    if u.stores_momentum or not u.cpu_kernel or u.kernel_unavailable(w.group) is not None:
        return False
    if any(opt._engine.segments.get(id(p)) for p in w.lists["params"]):
        return False
    tensors = [*w.lists["params"], *w.lists["grads"]]
    if any(st.local_tensor(t).dtype != torch.float32 for t in tensors):
        return False
    state = [t for i in range(len(w.lists["params"])) for t in _adam_tensors(w, i)]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in state):
        return False  # e.g. channels_last moments: torch's own update runs on the aggregates
    return all(s.device.type == "cpu" for s in w.lists["state_steps"])


def _adam_tensors(w: Any, i: int) -> list[Tensor]:
    """The local tensors the kernel's Adam update reads and writes for parameter ``i`` of ``w``."""
    lists = w.lists
    out = [lists["params"][i], lists["exp_avgs"][i], lists["exp_avg_sqs"][i]]
    if w.group["amsgrad"]:
        out.append(lists["max_exp_avg_sqs"][i])
    return [st.local_tensor(t) for t in out]


def to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """A small host array on ``device`` without blocking (pinned memory, asynchronous copy)."""
    host = torch.from_numpy(values)
    if device.type == "cpu":
        return host.clone()
    return host.pin_memory().to(device, non_blocking=True)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_in_capture(device: torch.device, why: str) -> None:
    """Raise where a CUDA graph is being captured on ``device``'s current stream: host-to-device copies of
    tables would be captured from a temporary buffer, and a replay would read stale addresses."""
    if capturing(device):
        raise RuntimeError(f"hf_memopt 'triton' executor during CUDA graph capture: {why}")


def group_ledger(opt: Any, index: int, group: dict[str, Any], topc: int, device: torch.device) -> DeviceLedger:
    """The device ledger of param group ``index``: cached while every memory state of the group has the scalars
    it bound (:class:`hf_memopt.engine.state.Binding`: a new parameter's first memory, a load, a scalar replaced
    or given new storage, or another executor's step rebinds it)."""
    key = ("triton-ledger", index)
    cached = opt._engine.cache.get(key)
    members = [(p, s) for p, s in zip(group["params"], map(opt.state.get, group["params"])) if s and "memory_sum" in s]
    if cached is not None:
        ledger, bindings = cached
        if len(members) == len(bindings) and all(b.holds(s) for b, (_p, s) in zip(bindings, members)):
            return ledger
    refuse_in_capture(
        device,
        "the ledger must be gathered from the state's scalars (first steps, a load, new parameters, a scalar "
        "replaced or given new storage); take a few eager steps before capturing, and change nothing between "
        "captured steps",
    )
    ledger, bindings = _bind_group_ledger(opt, index, group, members, topc, device)
    opt._engine.cache[key] = (ledger, bindings)
    return ledger


def _bind_group_ledger(
    opt: Any,
    index: int,
    group: dict[str, Any],
    members: list[tuple[Tensor, dict[str, Any]]],
    topc: int,
    device: torch.device,
) -> tuple[DeviceLedger, list[st.Binding]]:
    """Gather the ledger rows of ``members`` (the group's parameters with a memory, and their states) from the
    states' scalars (the truth) into one device table and point the scalars at it (``ledger.first``: each
    parameter's first row)."""
    params, states = [p for p, _s in members], [s for _p, s in members]
    tables = []
    for p, state in zip(params, states):
        try:
            tables.append(st.gather_scalars(state, topc, device))
        except ValueError as err:  # a scalar replaced by hand with one of another size
            raise ValueError(f"{guard.where(index, group, p)}: {err}") from None
    for p, (_pri, _at, count, _clock) in zip(params, tables):
        # a count the user replaced or gave new storage is checked here, before any write (one read, at a
        # rebind); one edited in place on the device is clamped by ``decide`` (a check would read the device)
        if bool(((count < 0) | (count > topc)).any()):
            raise guard.count_error(guard.where(index, group, p), int(count[(count < 0) | (count > topc)][0]), topc)
    first: dict[int, int] = {}
    rows = 0
    for p, (pri, *_rest) in zip(params, tables):
        first[id(p)] = rows
        rows += pri.shape[0]
    ledger = DeviceLedger(*(torch.cat(list(t)) for t in zip(*tables)), first)
    bindings = []
    for p, state, (pri, *_rest) in zip(params, states, tables):
        opt._engine.device_ledgers.pop(id(state["priority_0"]), None)
        r, units = first[id(p)], pri.shape[0]
        rows_of = slice(r, r + units)
        binding = st.bind_scalars(
            state, ledger.pri[rows_of], ledger.at[rows_of], ledger.count[rows_of], ledger.clock[rows_of]
        )
        opt._engine.device_ledgers[id(state["priority_0"])] = (binding, ledger, r, units)
        bindings.append(binding)
    return ledger, bindings


def build_layout(opt: Any, works: Sequence[Any], reducer: Any) -> Layout:
    k = kernels()
    units: list[tuple[int, int, Tensor, int, int, int]] = []
    unit_class: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    groups: list[Group] = []
    regions: dict[tuple[int, int], tuple[torch.dtype, int, bool, int]] = {}
    a_numel: dict[torch.dtype, int] = {}
    unit_a: list[int] = []
    unit_adam: list[list[int]] = []
    adam_ready = [adam_eligible(opt, w) for w in works]
    unit_work: list[int] = []
    s_ptrs: list[int] = []
    slot_ptrs: list[list[int]] = []
    slot_stride = max(w.cfg.topc for w in works)
    device = st.local_tensor(works[0].lists["params"][0]).device
    for wi, w in enumerate(works):
        cfg = w.cfg
        ledger = group_ledger(opt, w.index, w.group, cfg.topc, device)
        first = ledger.first
        u0 = len(units)
        rows: list[int] = []
        xs, gs = w.lists[w.update.memory_source], w.lists["grads"]
        slot_dtype = None
        for i, p in enumerate(w.lists["params"]):
            state = opt.state[p]
            x = st.local_tensor(xs[i])
            bounds = opt._engine.segments.get(id(p))
            offset = a_numel.get(x.dtype, 0)
            a_numel[x.dtype] = offset + x.numel()
            regions[(wi, i)] = (x.dtype, offset, bool(bounds), x.numel())
            adam_state = _adam_tensors(w, i) if adam_ready[wi] else []
            slots = [st.local_tensor(state[key]) for key in st.slot_keys(cfg.topc)]
            slot_dtype = slots[0].dtype
            s_local = st.local_tensor(state["memory_sum"])
            for si, (start, numel) in enumerate(bounds or [(-1, x.numel())]):
                units.append((wi, i, p, si, start, numel))
                unit_class.append((st.local_tensor(gs[i]).dtype, x.dtype, slot_dtype))
                unit_work.append(wi)
                unit_adam.append([t.data_ptr() + max(start, 0) * 4 for t in adam_state] + [0] * (4 - len(adam_state)))
                rows.append(first[id(p)] + si)
                base = max(start, 0)
                unit_a.append(offset + base)
                s_ptrs.append(s_local.data_ptr() + base * s_local.element_size())
                ptrs = [t.data_ptr() + base * t.element_size() for t in slots]
                slot_ptrs.append(ptrs + [0] * (slot_stride - len(ptrs)))
        coef_g, coef_s = rule.coefficients(np.arange(cfg.topc + 1), cfg.kappa, cfg.aggregation)
        groups.append(
            Group(
                index=w.index,
                work=wi,
                u0=u0,
                n=len(units) - u0,
                ledger=ledger,
                rows=to_device(np.array(rows, dtype=np.int64), device),
                coef_g=torch.from_numpy(coef_g.astype(np.float32)).to(device),
                coef_s=torch.from_numpy(coef_s.astype(np.float32)).to(device),
                limit=cast_limit(slot_dtype),
                topc=cfg.topc,
                decay=cfg.decay,
                key_group=cfg.key == "group",
            )
        )
    # chunks, grouped by dtype class (one launch per class), in unit order within a class
    chunk_unit: list[int] = []
    chunk_lo: list[int] = []
    chunk_hi: list[int] = []
    unit_chunk0 = [0] * len(units)
    unit_chunks = [0] * len(units)
    classes: list[ChunkClass] = []
    for cls in dict.fromkeys(zip(unit_class, unit_work)):
        c0 = len(chunk_unit)
        for u, (unit, ucls) in enumerate(zip(units, zip(unit_class, unit_work))):
            if ucls != cls:
                continue
            numel = unit[5]
            unit_chunk0[u] = len(chunk_unit)
            for lo in range(0, numel, k.CHUNK):
                chunk_unit.append(u)
                chunk_lo.append(lo)
                chunk_hi.append(min(lo + k.CHUNK, numel))
            unit_chunks[u] = len(chunk_unit) - unit_chunk0[u]
        classes.append(ChunkClass(*cls[0], work=cls[1], chunk0=c0, chunks=len(chunk_unit) - c0))
    classes = [c for c in classes if c.chunks]

    def dev(values: list[int] | list[list[int]]) -> Tensor:
        return to_device(np.array(values, dtype=np.int64), device)

    n = len(units)
    lay = Layout(
        units=units,
        classes=classes,
        groups=groups,
        chunk_unit=dev(chunk_unit),
        chunk_lo=dev(chunk_lo),
        chunk_hi=dev(chunk_hi),
        unit_chunk0=dev(unit_chunk0),
        unit_chunks=dev(unit_chunks),
        unit_s=dev(s_ptrs),
        unit_slots=dev(slot_ptrs),
        slot_stride=slot_stride,
        unit_a=dev(unit_a),
        unit_adam=dev(unit_adam),
        adam_ready=adam_ready,
        regions=regions,
        device=device,
        part_sq=torch.empty(max(len(chunk_unit), 1), dtype=torch.float64, device=device),
        part_max=torch.empty(max(len(chunk_unit), 1), dtype=torch.float32, device=device),
        unit_sq=torch.empty(n, dtype=torch.float64, device=device),
        unit_max=torch.empty(n, dtype=torch.float32, device=device),
        dec={  # in the order the kernels take them
            "cg": torch.empty(n, dtype=torch.float32, device=device),
            "cs": torch.empty(n, dtype=torch.float32, device=device),
            "mode": torch.empty(n, dtype=torch.int32, device=device),
            "slot": torch.empty(n, dtype=torch.int64, device=device),
            "refresh": torch.empty(n, dtype=torch.int32, device=device),
            "count": torch.empty(n, dtype=torch.int64, device=device),
        },
        same_x=all(w.update.memory_source == "grads" for w in works),
        views=[w.view for w in works],
    )
    if reducer is not None:
        _reducer_layout(opt, works, lay)
    return lay


def _reducer_layout(opt: Any, works: Sequence[Any], lay: Layout) -> None:
    """The reducer's unit list (every unit of every memory parameter of the groups, gradient or not: the same
    on every rank) and where this step's units sit in it."""
    position: dict[tuple[int, int], int] = {}
    for group in opt.param_groups:  # every memory group, as the host plan lays them out (plan.plan_groups)
        if MemoryConfig.from_group(group).kappa == 0.0:
            continue
        for p in group["params"]:
            for si in range(len(opt._engine.segments.get(id(p)) or [None])):
                position[(id(p), si)] = len(lay.reducer_units)
                lay.reducer_units.append((p, si))
    pos = [position[(id(p), si)] for _wi, _i, p, si, _s, _n in lay.units]
    limits = [g.limit for g in lay.groups for _ in range(g.n)]
    lay.reducer_pos = to_device(np.array(pos, dtype=np.int64), lay.device)
    lay.unit_limit = torch.tensor(limits, dtype=torch.float32).to(lay.device)
