"""The "triton" executor: the GPU engine. Decisions on the device, no host synchronisation in ``step()``.

A step over the param groups it runs is four kinds of Triton launch (:mod:`.triton_kernels`), each
serving every tensor at once through pointer tables, then the base optimizer's own update:

1. ``norm_partials``: per-chunk fp64 sums of squares of g (and the largest |x| of what is stored);
2. ``unit_sums``: per-unit norms (chunk partials in chunk order); under a norm reducer (sharded runs)
   the vector then goes through its collective (NCCL on a GPU: it stays on the device);
3. ``decide``, one per param group: SPEC 1's admission rule and commit on the device ledger;
4. ``apply``: the aggregates into one buffer per dtype, the admissions into the slots and S;
5. the base update: torch's own (fused, foreach or for-loop as the group asks) on the aggregates;
   Critical Momenta's ``finish`` (v and p from m~; its ``advance`` ran in :meth:`TritonExecutor.prepare`).

Where values live: the ledger (priorities, ``stored_at``, counts, clocks) of a param group is one set of
tables on the parameters' device (:class:`DeviceLedger`); the state's ``priority_i``, ``stored_at_i``,
``memory_count`` and ``memory_clock`` are views into it, so checkpoints keep SPEC section 3's layout. A
state bound elsewhere (a load, another executor's step) is gathered onto the device once, at the next
step; another executor gathers it back the same way. Admission counters for ``memory_stats()`` are device
counters, read only when it is called.

Host work per step is Python bookkeeping only: the kernels' pointer tables are cached, and a table
whose addresses changed (new gradient tensors) is copied from pinned memory without blocking. Nothing
reads a device value, so the step can be captured in a CUDA graph (``capturable=True``).

Exactness: decisions, slots and S equal the "torch" executor's; priorities too, except where an fp64
norm sits within ~1e-16 of an fp32 rounding boundary (see :mod:`.triton_kernels`); parameters agree to
the last bits (the aggregate of a bf16 gradient is rounded like torch's; the FMA is torch's).

Runs CUDA tensors, and CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the
first use), which is how the tests hold it to SPEC section 1 without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...config import MemoryConfig
from .. import rule
from .. import state as st
from .torch import _like

logger = logging.getLogger("hf_memopt")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET_ENV = "TRITON_INTERPRET"

_kernels: Any = None
_kernels_error: str | None = None
_interpreted = False


def kernels() -> Any:
    """The kernel module (imports Triton on first use), or None when Triton cannot be imported."""
    global _kernels, _kernels_error, _interpreted
    if _kernels is None and _kernels_error is None:
        try:
            from . import triton_kernels
        except Exception as exc:  # ImportError, or a Triton that fails to initialise
            _kernels_error = f"{type(exc).__name__}: {exc}"
        else:
            _kernels = triton_kernels
            # @triton.jit chose compiled or interpreted kernels when the module was imported
            _interpreted = os.environ.get(INTERPRET_ENV, "0") == "1"
    return _kernels


def triton_unavailable() -> str | None:
    """Why Triton cannot run here (None: it can)."""
    if kernels() is None:
        return (
            f"Triton cannot be imported ({_kernels_error}); it comes with CUDA builds of torch, or `pip install triton`"
        )
    return None


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run tensors of ``device`` (CUDA; the CPU only under the interpreter)."""
    if kernels() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreted)


_TL: dict[torch.dtype, Any] = {}


def _tl(dtype: torch.dtype) -> Any:
    if not _TL:
        tl = kernels().tl
        _TL.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TL[dtype]


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


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


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
        return st.Ledger(*(t.numpy() for t in host), anchor=host[0])


@dataclass(eq=False)
class _Group:
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
class _Class:
    """The units of one param group with one (g dtype, x dtype, slot dtype): one launch of each per-chunk kernel."""

    g_dtype: torch.dtype
    x_dtype: torch.dtype
    slot_dtype: torch.dtype
    work: int  # the param group (its index in the step's works): one launch per group and dtypes
    chunk0: int
    chunks: int


@dataclass(eq=False)
class _Layout:
    """Everything about a step's units that stays put between steps (cached per optimizer layout)."""

    units: list[tuple[int, int, Tensor, int, int, int]]  # (work, list index, param, segment, start or -1, numel)
    classes: list[_Class]
    groups: list[_Group]
    anchors: list[tuple[dict[str, Any], Tensor, Tensor]]  # (state, priority_0, memory_sum) as bound
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
    adam_ready: list[bool]  # per work: its Adam/AdamW update can run in the kernel (see _adam_eligible)
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

    def valid(self, opt: Any) -> bool:
        """Whether the states still point at what the tables were built from (a load or another executor
        rebinds them; a new parameter's first memory rebuilds its group's ledger)."""
        for g in self.groups:
            cached = opt._executor_cache.get(("triton-ledger", g.index))
            if cached is None or cached[0] is not g.ledger:
                return False
        return all(s.get("priority_0") is pri and s.get("memory_sum") is ms for s, pri, ms in self.anchors)


class TritonExecutor:
    """Runs param groups with the Triton kernels (see the module docstring)."""

    name = "triton"
    decides_on_host = False

    def unavailable(self, opt: Any, work: Any) -> str | None:
        """Why the kernels cannot run ``work`` (None: they can)."""
        reason = triton_unavailable()
        if reason is not None:
            return reason
        group = work.group
        if group.get("differentiable"):
            return "differentiable=True is not supported with the memory on"
        tensors = [st.local_tensor(p) for p in group["params"]]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            return f"its parameters are on several devices ({sorted(map(str, devices))})"
        for device in devices:
            if not runs_on(device):
                if device.type == "cpu":
                    return f"its parameters are CPU tensors, which Triton runs only under its interpreter ({INTERPRET_ENV}=1)"
                return f"Triton does not run {device.type} tensors"
        if group.get("capturable") and any(d.type == "cpu" for d in devices):
            return "capturable=True on CPU tensors (torch's optimizers capture CUDA-graph devices only)"
        for t in tensors:
            if t.dtype not in _DTYPES:
                return f"parameters of dtype {t.dtype} (Triton runs float32, bfloat16 and float16)"
        values = [*work.lists["grads"], *work.lists.get(work.update.memory_source, [])]
        if not all(st.local_tensor(v).is_contiguous() for v in values):
            return "a gradient (or momentum) is not contiguous"
        return None

    def prepare(self, opt: Any, works: Sequence[Any]) -> None:
        """Critical Momenta advances its momenta first (SPEC 1b.2): what is stored and tested is that m."""
        for w in works:
            if w.update.stores_momentum:
                w.update.advance(w.group, w.lists)

    def run(self, opt: Any, works: Sequence[Any]) -> None:
        memory = [w for w in works if w.cfg.kappa > 0.0]
        by_device: dict[torch.device, list[Any]] = {}
        for w in memory:  # one set of launches per device (a group's parameters share one)
            by_device.setdefault(st.local_tensor(w.lists["params"][0]).device, []).append(w)
        aggregates: dict[int, list[Tensor] | None] = {}
        for device_works in by_device.values():
            aggregates.update(self._memory_step(opt, device_works))
        for w in works:
            if aggregates.get(id(w), ()) is None:
                continue  # Adam/AdamW updated in the kernel's pass
            if id(w) not in aggregates:
                w.update.update(opt, w.group, w.lists, w.extra)  # kappa=0: torch's own optimizer
            elif w.update.stores_momentum:
                w.update.finish(w.group, w.lists, aggregates[id(w)])  # v and p from m~ (SPEC 1b.5)
            else:
                w.update.update(opt, w.group, dict(w.lists, grads=aggregates[id(w)]), w.extra)

    # -- one step ---------------------------------------------------------------------------

    def _memory_step(self, opt: Any, works: Sequence[Any]) -> dict[int, list[Tensor] | None]:
        """Steps 1-4 for ``works``; returns each work's aggregates for its base update (None: the kernel
        already ran its Adam/AdamW update)."""
        k = kernels()
        lay = self._layout(opt, works)
        adam = [_adam_scalars(opt, w) if lay.adam_ready[wi] else None for wi, w in enumerate(works)]
        x_lists = [w.lists[w.update.memory_source] for w in works]
        g_lists = [w.lists["grads"] for w in works]
        x_tab = self._pointers(lay, "x", x_lists)
        g_tab = x_tab if lay.same_x else self._pointers(lay, "g", g_lists)
        block = k.BLOCK
        # 1-2: norms
        for c in lay.classes:
            k.norm_partials[(c.chunks,)](
                g_tab,
                x_tab,
                lay.chunk_unit,
                lay.chunk_lo,
                lay.chunk_hi,
                lay.part_sq,
                lay.part_max,
                c.chunk0,
                G_DT=_tl(c.g_dtype),
                X_DT=_tl(c.x_dtype),
                SAME=lay.same_x,
                BLOCK=block,
            )
        n_units = len(lay.units)
        k.unit_sums[(n_units,)](
            lay.part_sq,
            lay.part_max,
            lay.unit_chunk0,
            lay.unit_chunks,
            lay.unit_sq,
            lay.unit_max,
            SUM_BLOCK=k.SUM_BLOCK,
        )
        sq = lay.unit_sq
        reducer = opt.norm_reducer
        if reducer is not None:
            sq = self._reduce(lay, reducer)
        # 3: decisions and commit, on the device
        stats = opt._stats.counters(lay.device)
        d = lay.dec
        for g in lay.groups:
            k.decide[(1,)](
                sq,
                lay.unit_max,
                g.u0,
                g.n,
                g.rows,
                g.ledger.pri,
                g.ledger.at,
                g.ledger.count,
                g.ledger.clock,
                g.coef_g,
                g.coef_s,
                *d.values(),  # cg, cs, mode, slot, refresh, count: the kernels' order
                stats,
                g.topc,
                g.limit,
                g.decay,
                REFRESH=rule.REFRESH_INTERVAL,
                KEY_GROUP=g.key_group,
                CHECK_CAST=reducer is None,
                BLOCK_U=min(_next_pow2(g.n), 128),  # a [BLOCK_U, topc] tile of priorities stays in registers
                BLOCK_C=_next_pow2(g.topc),
            )
        # 4: aggregate and admit (and Adam/AdamW's update, in the same pass)
        sizes: dict[torch.dtype, int] = {}
        for (wi, _i), (dtype, offset, _seg, numel) in lay.regions.items():
            if adam[wi] is None:
                sizes[dtype] = max(sizes.get(dtype, 0), offset + numel)
        buffers = {dt: torch.empty(n, dtype=dt, device=lay.device) for dt, n in sizes.items()}
        out: dict[int, list[Tensor] | None] = {}
        for wi, w in enumerate(works):
            if adam[wi] is not None:
                out[id(w)] = None
                continue
            xs = x_lists[wi]
            aggregates = list(xs)
            for i, x in enumerate(xs):
                dtype, offset, segmented, _numel = lay.regions[(wi, i)]
                local = st.local_tensor(x)
                region = buffers[dtype].narrow(0, offset, local.numel()).view_as(local)
                if segmented:
                    region.copy_(local)  # the elements outside its segments (padding) keep x
                aggregates[i] = _like(x, region)
            out[id(w)] = aggregates
        for c in lay.classes:
            scalars = adam[c.work]
            k.apply[(c.chunks,)](
                x_tab,
                lay.unit_s,
                lay.unit_slots,
                lay.unit_a,
                buffers.get(c.x_dtype, lay.unit_a) if scalars is None else lay.unit_a,  # unused with ADAM
                lay.chunk_unit,
                lay.chunk_lo,
                lay.chunk_hi,
                c.chunk0,
                *d.values(),  # cg, cs, mode, slot, refresh, count: the kernels' order
                lay.slot_stride,
                lay.unit_adam,
                *(scalars or _NO_ADAM).values(),
                X_DT=_tl(c.x_dtype),
                SLOT_DT=_tl(c.slot_dtype),
                ADAM=scalars is not None,
                DECOUPLED=bool(scalars and scalars["wd"] != 0 and works[c.work].group.get("decoupled_weight_decay")),
                AMSGRAD=bool(scalars and works[c.work].group["amsgrad"]),
                MAXIMIZE=bool(scalars and works[c.work].group["maximize"]),
                BLOCK=block,
            )
        return out

    def _reduce(self, lay: _Layout, reducer: st.NormReducer) -> Tensor:
        """Full-tensor norms through the reducer's collective, on the device. A unit whose stored value is
        not finite in the buffer dtype enters as inf, so every rank refuses its priority group alike."""
        assert lay.reducer_pos is not None and lay.unit_limit is not None
        local = torch.where(lay.unit_max < lay.unit_limit, lay.unit_sq, float("inf"))
        full = torch.zeros(len(lay.reducer_units), dtype=torch.float64, device=lay.device)
        full.index_copy_(0, lay.reducer_pos, local)
        full = reducer(lay.reducer_units, full)
        return full.index_select(0, lay.reducer_pos.to(full.device)).to(lay.device)

    def _pointers(self, lay: _Layout, name: str, lists: list[list[Tensor]]) -> Tensor:
        """The device table of the addresses of each unit's values (cached while they do not move)."""
        addresses = np.empty(len(lay.units), dtype=np.int64)
        for j, (wi, i, _p, _si, start, _n) in enumerate(lay.units):
            t = st.local_tensor(lists[wi][i])
            addresses[j] = t.data_ptr() + max(start, 0) * t.element_size()
        key = addresses.tobytes()
        cached = lay.pointers.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        table = _to_device(addresses, lay.device)
        lay.pointers[name] = (key, table)
        return table

    # -- the layout -------------------------------------------------------------------------

    def _layout(self, opt: Any, works: Sequence[Any]) -> _Layout:
        reducer = opt.norm_reducer
        key = (
            "triton",
            opt._layout_version,
            reducer is not None,
            tuple((w.index, tuple(map(id, w.lists["params"]))) for w in works),
        )
        lay = opt._executor_cache.get(key)
        if lay is not None:
            for w in works:  # the ledgers first: a rebound one makes the layout stale
                _group_ledger(opt, w.index, w.group, w.cfg.topc, lay.device)
        if lay is None or not lay.valid(opt):
            lay = _build_layout(opt, works, reducer)
            opt._executor_cache[key] = lay
        return lay


#: the Adam scalars of a launch without the in-kernel update (ignored by the kernel)
_NO_ADAM = dict(
    p_scale=1.0, wd=0.0, lerp_w=0.0, beta2=0.0, one_minus_beta2=0.0, bc2_sqrt=1.0, eps=0.0, neg_step_size=0.0
)


def _adam_eligible(opt: Any, w: Any) -> bool:
    """Whether the group's Adam/AdamW update can run inside the kernel's pass: torch's default
    implementation choice (no foreach/fused/capturable flag: the kernel stands in for its foreach
    update), numbers for lr and betas, fp32 tensors, CPU step counters, no segments (a flat
    partition's padding needs the plain update)."""
    u, g = w.update, w.group
    if u.stores_momentum or getattr(u, "kernel_args", None) is None:
        return False
    if g.get("foreach") is not None or g.get("fused") or g.get("capturable") or g.get("differentiable"):
        return False
    if isinstance(g["lr"], Tensor) or any(isinstance(b, Tensor) for b in g["betas"]):
        return False
    if any(opt._segments.get(id(p)) for p in w.lists["params"]):
        return False
    tensors = [*w.lists["params"], *w.lists["grads"]]
    if any(st.local_tensor(t).dtype != torch.float32 for t in tensors):
        return False
    return all(s.device.type == "cpu" for s in w.lists["state_steps"])


def _adam_tensors(w: Any, i: int) -> list[Tensor]:
    """The local tensors the kernel's Adam update reads and writes for parameter ``i`` of ``w``."""
    lists = w.lists
    out = [lists["params"][i], lists["exp_avgs"][i], lists["exp_avg_sqs"][i]]
    if w.group["amsgrad"]:
        out.append(lists["max_exp_avg_sqs"][i])
    return [st.local_tensor(t) for t in out]


def _adam_scalars(opt: Any, w: Any) -> dict[str, float] | None:
    """This step's Adam/AdamW scalars, as torch's single-tensor update computes them (Python floats),
    after counting the step; None when the group's step counters differ (torch's own update then runs
    on the aggregates, and counts the step itself).

    The counters are CPU tensors (reading them waits for nothing). They are read once; after that the
    executor knows their value while their version counters say nothing else wrote them."""
    args = w.update.kernel_args(w.group, w.lists)
    key = ("triton-steps", w.index)
    known = opt._executor_cache.get(key)
    ids = tuple(map(id, args.steps))
    if known is not None and known[0] == ids and known[1] == tuple(s._version for s in args.steps):
        count = known[2]
    else:
        counts = [float(s) for s in args.steps]
        if not counts or any(c != counts[0] for c in counts):
            return None
        count = counts[0]
    torch._foreach_add_(args.steps, 1)
    t = count + 1
    opt._executor_cache[key] = (ids, tuple(s._version for s in args.steps), t)
    return dict(
        p_scale=1 - args.lr * args.weight_decay,
        wd=args.weight_decay,
        lerp_w=1 - args.beta1,
        beta2=args.beta2,
        one_minus_beta2=1 - args.beta2,
        bc2_sqrt=(1 - args.beta2**t) ** 0.5,
        eps=args.eps,
        neg_step_size=-(args.lr / (1 - args.beta1**t)),
    )


def _to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """A small host array on ``device`` without blocking (pinned memory, asynchronous copy)."""
    host = torch.from_numpy(values)
    if device.type == "cpu":
        return host.clone()
    return host.pin_memory().to(device, non_blocking=True)


def _group_ledger(opt: Any, index: int, group: dict[str, Any], topc: int, device: torch.device) -> DeviceLedger:
    """The device ledger of param group ``index``: cached while every memory state of the group points at it
    (a new parameter's first memory, a load or another executor's step rebinds it)."""
    key = ("triton-ledger", index)
    cached = opt._executor_cache.get(key)
    if cached is not None:
        ledger, bound = cached
        current = [opt.state[p]["priority_0"] for p in group["params"] if "memory_sum" in opt.state.get(p, {})]
        if len(current) == len(bound) and all(a is b for a, b in zip(current, bound)):
            return ledger
    ledger = _bind_group_ledger(opt, group, topc, device)
    bound = [opt.state[p]["priority_0"] for p in group["params"] if "memory_sum" in opt.state.get(p, {})]
    opt._executor_cache[key] = (ledger, bound)
    return ledger


def _bind_group_ledger(opt: Any, group: dict[str, Any], topc: int, device: torch.device) -> DeviceLedger:
    """Gather the ledger rows of every memory parameter of ``group`` into one device table and point the
    states at it (``ledger.first``: each parameter's first row)."""
    pri, at, count, clock = [], [], [], []
    first: dict[int, int] = {}
    states = []
    rows = 0
    for p in group["params"]:
        state = opt.state.get(p, {})
        if "memory_sum" not in state:
            continue
        anchor = state["priority_0"]
        units = 1 if anchor.dim() == 0 else anchor.shape[0]
        pri.append(
            torch.stack([state[f"priority_{i}"].detach().reshape(units) for i in range(topc)], 1).to(
                device, torch.float32
            )
        )
        at.append(
            torch.stack([state[f"stored_at_{i}"].detach().reshape(units) for i in range(topc)], 1).to(
                device, torch.int64
            )
        )
        count.append(state["memory_count"].detach().reshape(units).to(device, torch.int64))
        clock.append(state["memory_clock"].detach().reshape(units).to(device, torch.int64))
        first[id(p)] = rows
        opt._device_ledgers.pop(id(anchor), None)
        states.append((p, state, units))
        rows += units
    ledger = DeviceLedger(torch.cat(pri), torch.cat(at), torch.cat(count), torch.cat(clock), first)
    for p, state, units in states:
        r = first[id(p)]
        st.bind_scalars(
            state,
            ledger.pri[r : r + units],
            ledger.at[r : r + units],
            ledger.count[r : r + units],
            ledger.clock[r : r + units],
        )
        opt._device_ledgers[id(state["priority_0"])] = (state["priority_0"], ledger, r, units)
    return ledger


def _build_layout(opt: Any, works: Sequence[Any], reducer: Any) -> _Layout:
    k = kernels()
    units: list[tuple[int, int, Tensor, int, int, int]] = []
    unit_class: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    groups: list[_Group] = []
    anchors = []
    regions: dict[tuple[int, int], tuple[torch.dtype, int, bool, int]] = {}
    a_numel: dict[torch.dtype, int] = {}
    unit_a: list[int] = []
    unit_adam: list[list[int]] = []
    adam_ready = [_adam_eligible(opt, w) for w in works]
    unit_work: list[int] = []
    s_ptrs: list[int] = []
    slot_ptrs: list[list[int]] = []
    slot_stride = max(w.cfg.topc for w in works)
    device = st.local_tensor(works[0].lists["params"][0]).device
    for wi, w in enumerate(works):
        cfg = w.cfg
        ledger = _group_ledger(opt, w.index, w.group, cfg.topc, device)
        first = ledger.first
        u0 = len(units)
        rows: list[int] = []
        xs, gs = w.lists[w.update.memory_source], w.lists["grads"]
        slot_dtype = None
        for i, p in enumerate(w.lists["params"]):
            state = opt.state[p]
            anchors.append((state, state["priority_0"], state["memory_sum"]))
            x = st.local_tensor(xs[i])
            bounds = opt._segments.get(id(p))
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
            _Group(
                index=w.index,
                work=wi,
                u0=u0,
                n=len(units) - u0,
                ledger=ledger,
                rows=_to_device(np.array(rows, dtype=np.int64), device),
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
    classes: list[_Class] = []
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
        classes.append(_Class(*cls[0], work=cls[1], chunk0=c0, chunks=len(chunk_unit) - c0))
    classes = [c for c in classes if c.chunks]

    def dev(values: list[int] | list[list[int]]) -> Tensor:
        return _to_device(np.array(values, dtype=np.int64), device)

    n = len(units)
    lay = _Layout(
        units=units,
        classes=classes,
        groups=groups,
        anchors=anchors,
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
    )
    if reducer is not None:
        _reducer_layout(opt, works, lay)
    return lay


def _reducer_layout(opt: Any, works: Sequence[Any], lay: _Layout) -> None:
    """The reducer's unit list (every unit of every memory parameter of the groups, gradient or not: the same
    on every rank) and where this step's units sit in it."""
    position: dict[tuple[int, int], int] = {}
    for group in opt.param_groups:  # every memory group, as the host plan lays them out (plan.plan_groups)
        if MemoryConfig.from_group(group).kappa == 0.0:
            continue
        for p in group["params"]:
            for si in range(len(opt._segments.get(id(p)) or [None])):
                position[(id(p), si)] = len(lay.reducer_units)
                lay.reducer_units.append((p, si))
    pos = [position[(id(p), si)] for _wi, _i, p, si, _s, _n in lay.units]
    limits = [g.limit for g in lay.groups for _ in range(g.n)]
    lay.reducer_pos = _to_device(np.array(pos, dtype=np.int64), lay.device)
    lay.unit_limit = torch.tensor(limits, dtype=torch.float32).to(lay.device)
