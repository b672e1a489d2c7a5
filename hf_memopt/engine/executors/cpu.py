"""The "cpu" executor: the C kernel (``memopt_cpu.c``) for Adam/AdamW on fp32 CPU tensors.

Two modes, both one parallel pass over memory per step:

* whole step (one process, no segments): ``memopt_adam_fused`` takes norms, priorities, decisions
  (its C transcription of :mod:`hf_memopt.engine.rule`), the single-pass update and the ledger
  commit in one call over every unit of every group it runs. The per-group kernel columns are kept
  between steps (:class:`_FusedTable`);
* host decisions (a norm reducer is set: sharded runs): :mod:`hf_memopt.engine.plan` decides, and
  ``memopt_adam_step`` does aggregation, admission and the Adam(W) update in one pass.

Critical Momenta (SPEC 1b) has its own loop in the kernel (``cm_loop``: lerp of m, ``m~ = m + cs S``,
admission of m, v and p from m~; the same words per element as Adam's). Whole step: the castability
of m in bf16 memory is taken from a max-abs pass that recomputes the new m without writing it. Host
decisions: :meth:`CpuExecutor.prepare` advances m with torch ops first, and the loop starts from it.

Priorities equal the "torch" executor's on CPU bit for bit (both use the kernel's fixed-order fp64
norms); parameters agree to the last bits (the update is one fused loop, torch's is several ops).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import rule
from .. import state as st
from ..guard import count_error, where
from . import cpu_kernel
from .cpu_kernel import AGGREGATION_CODES, COLUMNS
from .torch import commit

_PLAIN = (Tensor, torch.nn.Parameter)


def _fp32_cpu(t: Tensor) -> bool:
    """A contiguous fp32 CPU tensor (its local part for a DTensor). Runs for every tensor at every step:
    ``is_cpu`` rather than ``device.type``, which builds a device object each time."""
    if type(t) not in _PLAIN:
        t = st.local_tensor(t)
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()


class CpuExecutor:
    """Runs Adam/AdamW param groups of fp32 CPU tensors with the C kernel."""

    name = "cpu"

    def unavailable(self, opt: Any, work: Any) -> str | None:
        """Why the kernel cannot run ``work`` this step, in words (None: it can)."""
        group, cfg = work.group, work.cfg
        if not work.update.cpu_kernel:
            return f"{type(opt).__name__}'s base update has no CPU kernel (Adam, AdamW and Critical Momenta have)"
        if cfg.kappa == 0.0:
            return "kappa=0 turns the memory off; the group runs torch's own optimizer"
        reason = work.update.kernel_unavailable(group)
        if reason is not None:
            return reason
        if cfg.buffer_dtype not in (None, torch.float32, torch.bfloat16):
            return f"buffer_dtype={cfg.buffer_dtype} (the kernel stores fp32 or bf16)"
        tensors = [*work.lists["params"], *work.lists["grads"]]
        if not all(map(_fp32_cpu, tensors)):
            return "its parameters and gradients must be contiguous fp32 CPU tensors"
        if cpu_kernel.load() is None:
            return (
                f"the CPU kernel could not be built (a C compiler is needed; {cpu_kernel.KERNELS_ENV}=0 turns it off)"
            )
        # the state too ("auto" must not pick an executor that then refuses the group); judged once per view
        if work.view is None:
            return None  # no parameter has a gradient: nothing to run
        if "cpu" not in work.view.verdicts:
            work.view.verdicts["cpu"] = _state_reason(opt, work)
        return work.view.verdicts["cpu"]

    def prepare(self, opt: Any, works: Sequence[Any]) -> None:
        """Before host decisions, Critical Momenta advances its momenta with torch ops (step, decoupled
        decay, lerp of m), so that the plan's castability test (SPEC 1.3) reads the m that is stored;
        the C loop then starts from the advanced m (``MOMENTUM_READY``). The whole-step kernel needs no
        preparation: it computes the max-abs of the new m in its own pass before it decides."""
        for w in works:
            if w.update.stores_momentum and self.decides_on_host(opt, w):
                w.update.advance(w.group, w.lists)
                w.admit = w.lists[w.update.memory_source]

    def decides_on_host(self, opt: Any, work: Any) -> bool:
        """Host decisions under a norm reducer or with segments; else the whole step runs in C."""
        return opt.norm_reducer is not None or any(id(p) in opt._engine.segments for p in work.lists["params"])

    def run(self, opt: Any, works: Sequence[Any]) -> None:
        whole = [w for w in works if w.plan is None]
        planned = [w for w in works if w.plan is not None]
        if whole:
            _run_whole_step(opt, [_fused_table(opt, w) for w in whole])
        if planned:
            _run_planned(opt, planned)


def _state_reason(opt: Any, work: Any) -> str | None:
    """Why the kernel cannot run ``work``'s state (None: it can): Adam's moments and S contiguous fp32 CPU
    tensors, the slots contiguous in the buffer dtype, the step counters fp32 CPU scalars."""
    cfg = work.cfg
    args = work.update.kernel_args(work.group, work.lists)
    slot_dtype = torch.bfloat16 if cfg.buffer_dtype == torch.bfloat16 else torch.float32
    for j, p in enumerate(work.lists["params"]):
        state = opt.state[p]
        tensors = {"exp_avg": args.exp_avgs[j], "exp_avg_sq": args.exp_avg_sqs[j], "memory_sum": state["memory_sum"]}
        if args.amsgrad:
            tensors["max_exp_avg_sq"] = args.max_exp_avg_sqs[j]
        bad = [k for k, t in tensors.items() if not _fp32_cpu(t)]
        bad += [k for k in st.slot_keys(cfg.topc) if not _dense(st.local_tensor(state[k]), slot_dtype)]
        step = args.steps[j]
        if not (step.dtype == torch.float32 and step.is_cpu and step.dim() == 0):
            bad.append("step")
        if bad:
            return (
                f"the optimizer state of parameter {j} ({', '.join(bad)}) is not contiguous {slot_dtype} on the "
                "CPU as the kernel reads it (e.g. channels_last state, or state moved to another dtype or device)"
            )
    return None


def _dense(t: Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.is_cpu and t.is_contiguous()


# -- whole step in C ----------------------------------------------------------------------------


def _fused_table(opt: Any, work: Any) -> _FusedTable:
    """The group's cached kernel columns with this step's addresses."""
    args = work.update.kernel_args(work.group, work.lists)
    table = opt._engine.cache.get(("cpu", work.index))
    # a steady step (hf_memopt.engine.snapshot) re-checked everything still_valid reads, ledger scalars included
    if table is None or not (work.steady and table.view is work.view) and not table.still_valid(opt, work):
        table = _FusedTable(opt, work, args)
        opt._engine.cache[("cpu", work.index)] = table
    # Gradients are new tensors every step (zero_grad(set_to_none=True)): their addresses are read every
    # step. Everything else the table holds is the view's (see hf_memopt.engine.guard).
    if args.momentum:
        table.check_momenta(args.exp_avgs)
    if work.steady:
        table.q[:, COLUMNS.fused_ptrs.GRAD] = work.grad_ptrs
    else:
        table.q[:, COLUMNS.fused_ptrs.GRAD] = [
            (g if type(g) is Tensor else st.local_tensor(g)).data_ptr() for g in work.lists["grads"]
        ]
    f = COLUMNS.fused_floats
    table.floats[:, [f.LR, f.WD, f.BETA1, f.BETA2, f.EPS]] = (
        args.lr,
        args.weight_decay,
        args.beta1,
        args.beta2,
        args.eps,
    )
    return table


def _run_whole_step(opt: Any, tables: list[_FusedTable]) -> None:
    if len(tables) == 1:
        t = tables[0]
        q, ints, floats, numels, slot_ptrs = t.q, t.ints, t.floats, t.numels, t.slot_ptrs
    else:
        # several groups in one call: renumber their priority groups and slot offsets
        j = COLUMNS.fused_ints
        q = np.concatenate([t.q for t in tables])
        ints = np.concatenate([t.ints for t in tables])
        floats = np.concatenate([t.floats for t in tables])
        numels = np.concatenate([t.numels for t in tables])
        slot_ptrs = np.concatenate([t.slot_ptrs for t in tables])
        row = slot_off = 0
        for gi, t in enumerate(tables):
            n = len(t.numels)
            ints[row : row + n, j.SLOTS] += slot_off
            ints[row : row + n, j.GROUP] = np.where(ints[row : row + n, j.GROUP] >= 0, gi, -1)
            row += n
            slot_off += len(t.slot_ptrs)
    try:
        out = cpu_kernel.adam_fused(q, ints, floats, numels, slot_ptrs, cpu_kernel.kernel_threads())
    except cpu_kernel.CountOutOfRangeError as err:  # checked in C before anything is written
        unit = err.unit
        for t in tables:
            if unit < len(t.numels):
                t.count_error(unit)
            unit -= len(t.numels)
        raise
    row = 0
    for t in tables:
        n = len(t.numels)
        opt._engine.stats.record(out[row : row + n, 0])
        for u in np.flatnonzero(out[row : row + n, 2]):
            state = t.states[u]
            slots = [st.local_tensor(state[k]) for k in st.slot_keys(t.topc)]
            _refresh_sum(st.local_tensor(state["memory_sum"]), slots, int(t.ledgers[u].count[0]))
        row += n


def _refresh_sum(s: Tensor, slots: list[Tensor], count: int) -> None:
    """Rebuild ``S`` exactly (fp32, slot order) from the filled slots."""
    s.copy_(slots[0])
    for i in range(1, count):
        s.add_(slots[i])


class _FusedTable:
    """Kernel columns of one param group for ``memopt_adam_fused``, kept between steps.

    Valid while the group's state view is the one it was built from (the same tensors, storages, sizes
    and group flags: :mod:`hf_memopt.engine.guard`) and the same ledgers (a load replaces them and bumps
    the optimizer's layout version); the gradient addresses are read every step.
    """

    def __init__(self, opt: Any, work: Any, args: Any) -> None:
        cfg = work.cfg
        self.view, self.group = work.view, work.group
        self.version, self.state_obj = opt._engine.layout_version, opt.state
        self.params = list(work.lists["params"])
        self.topc = cfg.topc
        self.states = [opt.state[p] for p in self.params]
        n = len(self.params)
        P, J, H = COLUMNS.fused_ptrs, COLUMNS.fused_ints, COLUMNS.fused_floats
        self.q = np.zeros((n, len(P)), dtype=np.int64)
        self.ints = np.zeros((n, len(J)), dtype=np.int64)
        self.floats = np.zeros((n, len(H)), dtype=np.float64)
        self.numels = np.zeros(n, dtype=np.int64)
        # Critical Momenta: per unit, a bound on |m| the kernel keeps between steps (+inf: unknown), valid
        # while only the kernel writes m (its writes leave torch's version counters alone)
        self.m_bound = np.full(n, np.inf, dtype=np.float64)
        self.m_versions: list[int] = [] if not args.momentum else [st.local_tensor(m)._version for m in args.exp_avgs]
        self.slot_ptrs = np.zeros(n * cfg.topc, dtype=np.int64)
        self.ledgers: list[st.Ledger] = []
        self.keep_alive: list[Tensor] = []  # the kernel holds raw addresses of these
        bf16 = cfg.buffer_dtype == torch.bfloat16
        for j, (p, state) in enumerate(zip(self.params, self.states)):
            lp = st.local_tensor(p)
            moments = [st.local_tensor(args.exp_avgs[j]), st.local_tensor(args.exp_avg_sqs[j])]
            vmax = st.local_tensor(args.max_exp_avg_sqs[j]) if args.amsgrad else None
            s = st.local_tensor(state["memory_sum"])
            slots = [st.local_tensor(state[k]) for k in st.slot_keys(cfg.topc)]
            step = args.steps[j]
            tensors = [lp, *moments, s, *([vmax] if vmax is not None else [])]
            # unavailable() judged this state (contiguous fp32, slots of the buffer dtype) and the guard
            # checked every size against the parameter's: what follows reads inside those buffers
            try:
                led = st.ledger_of(state, cfg.topc, opt._engine.ledgers)
            except ValueError as err:  # a scalar replaced by hand with one of another size
                raise ValueError(f"{where(work.index, work.group, p)}: {err}") from None
            self.ledgers.append(led)
            self.keep_alive += [*tensors, *slots, step]
            row = self.q[j]
            row[P.PARAM], row[P.EXP_AVG], row[P.EXP_AVG_SQ] = lp.data_ptr(), *(m.data_ptr() for m in moments)
            row[P.MAX_EXP_AVG_SQ] = vmax.data_ptr() if vmax is not None else 0
            row[P.SUM], row[P.STEP] = s.data_ptr(), step.data_ptr()
            row[P.PRI], row[P.STORED_AT] = led.priorities.ctypes.data, led.stored_at.ctypes.data
            row[P.COUNT], row[P.CLOCK] = led.count.ctypes.data, led.clock.ctypes.data
            row[P.M_BOUND] = self.m_bound.ctypes.data + j * self.m_bound.itemsize
            self.slot_ptrs[j * cfg.topc : (j + 1) * cfg.topc] = [x.data_ptr() for x in slots]
            ints = self.ints[j]
            ints[J.TOPC], ints[J.SLOTS] = cfg.topc, j * cfg.topc
            ints[J.GROUP] = 0 if cfg.key == "group" else -1
            ints[J.AGG], ints[J.SLOT_BF16] = AGGREGATION_CODES[cfg.aggregation], bf16
            ints[J.AMSGRAD], ints[J.MAXIMIZE], ints[J.DECOUPLED] = args.amsgrad, args.maximize, args.decoupled
            ints[J.MOMENTUM] = args.momentum
            self.numels[j] = lp.numel()
        self.floats[:, H.KAPPA] = cfg.kappa
        self.floats[:, H.DECAY] = cfg.decay

    def count_error(self, j: int) -> None:
        """Raise the error of unit ``j``'s ``memory_count`` outside [0, topc] (the kernel checks every count
        before it writes anything: the scalars are the user's to edit in place)."""
        raise count_error(where(self.view.index, self.group, self.params[j]), int(self.ledgers[j].count[0]), self.topc)

    def check_momenta(self, exp_avgs: list[Tensor]) -> None:
        """Forget the bounds on |m| if anything but the kernel wrote a momentum since the last step (a torch op
        bumps the tensor's version counter: e.g. a step taken by the "torch" executor in between)."""
        versions = [st.local_tensor(m)._version for m in exp_avgs]
        if versions != self.m_versions:
            self.m_bound[:] = np.inf
            self.m_versions = versions

    def still_valid(self, opt: Any, work: Any) -> bool:
        """Whether the table still describes the state: the same view (tensors, storages, sizes, flags) and
        ledgers (a load, or another executor's step, rebinds the scalars to new tables)."""
        return (
            self.view is work.view
            and self.version == opt._engine.layout_version
            and self.state_obj is opt.state
            and all(led.binding.holds(s) for led, s in zip(self.ledgers, self.states))
        )


# -- host decisions, update in C ------------------------------------------------------------------


def _run_planned(opt: Any, works: Sequence[Any]) -> None:
    """``memopt_adam_step`` over every unit of ``works`` with the decisions of their host plans."""
    ptrs: list[list[int]] = []
    numels: list[int] = []
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    refresh: list[tuple[dict[str, Any], int, int, int, int]] = []
    P, N, F = COLUMNS.step_ptrs, COLUMNS.step_ints, COLUMNS.step_floats
    for w in works:
        plan, cfg = w.plan, w.cfg
        args = w.update.kernel_args(w.group, w.lists)
        if not args.momentum:  # Critical Momenta's prepare counted the step already
            torch._foreach_add_(args.steps, 1)
        step_of = torch.stack(args.steps).tolist()
        # torch's single-tensor Adam computes these in Python floats; so do we, once per distinct step
        coef = {s: args.bias_corrections(s) for s in set(step_of)}
        d = plan.d
        n = len(plan.units)
        modes, slots = d.mode.tolist(), d.slot.tolist()
        gi = np.zeros((n, len(N)), dtype=np.int64)
        gi[:, N.MODE] = d.mode
        gi[:, N.SLOT_BF16] = (d.mode != rule.MODE_NONE) & (cfg.buffer_dtype == torch.bfloat16)
        gi[:, N.AMSGRAD], gi[:, N.MAXIMIZE], gi[:, N.DECOUPLED] = args.amsgrad, args.maximize, args.decoupled
        gi[:, N.MOMENTUM] = cpu_kernel.MOMENTUM_READY if args.momentum else cpu_kernel.MOMENTUM_NONE
        gf = np.empty((n, len(F)), dtype=np.float64)
        gf[:, F.COEF_G], gf[:, F.COEF_S] = d.coef_g, d.coef_s
        gf[:, [F.LR, F.WD, F.BETA1, F.BETA2, F.EPS]] = (args.lr, args.weight_decay, args.beta1, args.beta2, args.eps)
        gf[:, [F.STEP_SIZE, F.BC2_SQRT]] = [coef[step_of[i]] for _p, i, _si, _start in plan.units]
        for j, (p, i, si, start) in enumerate(plan.units):
            state = plan.states[j]
            lp = st.local_tensor(p)
            numel = lp.numel() if start < 0 else opt._engine.segments[id(p)][si][1]
            off = 4 * max(start, 0)
            row = [0] * len(P)
            row[P.PARAM] = lp.data_ptr() + off
            row[P.GRAD] = st.local_tensor(w.lists["grads"][i]).data_ptr() + off
            row[P.EXP_AVG] = st.local_tensor(args.exp_avgs[i]).data_ptr() + off
            row[P.EXP_AVG_SQ] = st.local_tensor(args.exp_avg_sqs[i]).data_ptr() + off
            row[P.MAX_EXP_AVG_SQ] = st.local_tensor(args.max_exp_avg_sqs[i]).data_ptr() + off if args.amsgrad else 0
            row[P.SUM] = st.local_tensor(state["memory_sum"]).data_ptr() + off
            if modes[j] != rule.MODE_NONE:
                slot = st.local_tensor(state[f"memory_{slots[j]}"])
                row[P.SLOT] = slot.data_ptr() + max(start, 0) * slot.element_size()
            ptrs.append(row)
            numels.append(numel)
        ints.append(gi)
        floats.append(gf)
        for j in np.flatnonzero(d.refresh):
            refresh.append((plan.states[j], plan.units[j][3], numels[-n + j], int(d.count_after[j]), cfg.topc))
    if not ptrs:
        return
    cpu_kernel.adam_step(
        np.array(ptrs, dtype=np.int64),
        np.concatenate(ints),
        np.concatenate(floats),
        np.array(numels),
        cpu_kernel.kernel_threads(),
    )
    for w in works:  # the kernel's one pass did admission and update together
        commit(opt, w)
    for state, start, numel, count, topc in refresh:
        whole = start < 0
        slots = [st.unit_view(state[k], start, numel, whole) for k in st.slot_keys(topc)]
        _refresh_sum(st.unit_view(state["memory_sum"], start, numel, whole), slots, count)
