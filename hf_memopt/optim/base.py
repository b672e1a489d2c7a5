"""What the four memory-augmented optimizers share: the step around the base update.

Each optimizer subclasses its torch counterpart (so it takes exactly torch's arguments and
builds torch's state lazily through torch's own ``_init_group``) and this mixin, which adds
the memory hyperparameters and replaces ``step``:

1. torch's ``_init_group`` collects the parameters with a gradient and their base state;
2. one batched norm computation, an optional all-reduce (``norm_reducer``) and one
   device-to-host transfer give every priority; the admission decisions are taken on the host;
3. the base update runs on the aggregated gradient: torch's functional kernels (for-loop,
   foreach or fused, as the group asks), or the single-pass CPU kernel for Adam/AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .. import memory as mem
from .._kernels import load as load_kernel
from ..config import MemoryConfig

#: Gradient-sized temporaries (the aggregated gradients) allowed in flight on the eager path
#: before the base update runs on them; bounds the transient memory to about this many bytes
#: or one tensor, never a copy of the whole model.
TEMP_BUDGET_BYTES = 64 * 2**20

Lists = dict[str, list[Any]]


class MemoryAugmentedOptimizer:
    """Mixin: the critical-gradient memory on top of a ``torch.optim`` optimizer."""

    #: names of the torch ``_init_group`` output lists, in its argument order (after ``group``)
    _list_names: ClassVar[tuple[str, ...]]
    #: True where the single-pass CPU kernel implements the base update (Adam, AdamW)
    _has_cpu_kernel: ClassVar[bool] = False

    state: Any
    param_groups: list[dict[str, Any]]

    def _setup_memory(self, **memory: Any) -> None:
        """Validate the memory defaults; call before the torch counterpart's ``__init__``."""
        self._memory_defaults = MemoryConfig(**memory).as_group_entries()
        self._ledgers: dict[int, mem.Ledger] = {}
        self._segments: dict[int, list[tuple[int, int]]] = {}
        self._stats = _Stats()
        self._pending_memory: tuple[dict[Any, dict[str, Any]], list[Any]] | None = None
        #: turns local squared norms into full-tensor ones under sharding; see ``hf_memopt.distributed``
        self.norm_reducer: mem.NormReducer | None = None
        self._auto_reducer_checked = False
        #: kernel columns per param group for the whole-step CPU kernel, and a counter that invalidates them
        self._fused_tables: dict[int, _FusedTable] = {}
        self._layout_version = 0

    def _finish_setup(self) -> None:
        """Call after the torch counterpart's ``__init__``."""
        self.defaults.update(self._memory_defaults)  # type: ignore[attr-defined]
        # torch's fused Adam lets GradScaler hand it still-scaled gradients; the memory must see
        # unscaled ones, so GradScaler has to unscale before step().
        self._step_supports_amp_scaling = False
        self.register_load_state_dict_pre_hook(_take_memory_out)  # type: ignore[attr-defined]
        self.register_load_state_dict_post_hook(_put_memory_back)  # type: ignore[attr-defined]

    # -- param groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for name, value in getattr(self, "_memory_defaults", {}).items():
            param_group.setdefault(name, value)
        cfg = MemoryConfig.from_group(param_group)  # raises ValueError naming the bad argument
        param_group.update(cfg.as_group_entries())
        super().add_param_group(param_group)  # type: ignore[misc]
        self._auto_reducer_checked = False
        self._layout_version = getattr(self, "_layout_version", 0) + 1

    def bind_segments(self, param: Tensor, segments: list[tuple[int, int]] | None) -> None:
        """Give ``param`` (a flat partition) one memory unit per ``(start, numel)`` segment.

        Used by the DeepSpeed adapter; must happen before the first step (or on a state with
        as many units, e.g. one just loaded from a checkpoint).
        """
        state = self.state.get(param, {})
        if "memory_sum" in state:
            # Allowed on a state of the same layout, e.g. loaded from a checkpoint before binding.
            units = state["priority_0"].numel()
            wanted = len(segments) if segments else 1
            if units != wanted:
                raise RuntimeError(
                    f"bind_segments: this parameter's memory has {units} unit(s) but {wanted} segment(s) "
                    "were given; bind before the first optimizer step"
                )
        if segments:
            self._segments[id(param)] = [(int(s), int(n)) for s, n in segments]
        else:
            self._segments.pop(id(param), None)
        self._layout_version += 1

    # -- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step (SPEC section 1, steps 1-5)."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None)
        if check is not None:
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Resolved before any state is allocated: a reducer may bind segments (DeepSpeed).
        self._reducer()
        batches = []
        for group in self.param_groups:
            cfg = MemoryConfig.from_group(group)
            if cfg.kappa > 0.0:
                for name in ("capturable", "differentiable"):
                    if group.get(name):
                        raise ValueError(
                            f"{name}=True is not supported with the memory on (kappa > 0): admission "
                            f"decisions are taken on the host; use kappa=0 or {name}=False"
                        )
            lists: Lists = {name: [] for name in self._list_names}
            extra = self._init_group(group, *lists.values())  # type: ignore[attr-defined]
            if cfg.kappa > 0.0:
                for p in lists["params"]:
                    state = self.state[p]
                    if "memory_sum" not in state:
                        if torch.is_complex(p):
                            raise ValueError("complex parameters are not supported with the memory on (kappa > 0)")
                        mem.init_state(p, state, cfg, len(mem.segments_of(p, self._segments.get(id(p)))))
            batches.append((group, cfg, lists, extra))

        # Groups the whole-step kernel takes (one process, CPU fp32, no segments): decided and updated in C.
        whole_step: dict[int, _FusedTable] = {}
        if self.norm_reducer is None:
            for gi, (group, cfg, lists, _extra) in enumerate(batches):
                if cfg.kappa > 0.0 and lists["params"] and self._kernel_eligible(group, cfg):
                    table = self._fused_table(gi, group, cfg, lists)
                    if table is not None:
                        whole_step[gi] = table
        plans = self._plan(batches, skip=whole_step)
        if whole_step:
            self._run_whole_step(list(whole_step.values()))
        fast: list[tuple[dict[str, Any], MemoryConfig, Lists, _Plan]] = []
        for gi, ((group, cfg, lists, extra), plan) in enumerate(zip(batches, plans)):
            if not lists["params"] or gi in whole_step:
                continue
            if cfg.kappa == 0.0:
                self._update(group, lists, extra)
            elif plan is not None and self._kernel_eligible(group, cfg):
                fast.append((group, cfg, lists, plan))
            else:
                self._eager_group(group, lists, extra, plan)
        if fast:
            self._run_fast(fast, batches, plans)
        for (_group, cfg, _lists, _extra), plan in zip(batches, plans):
            if plan is not None:
                mem.commit(plan.rows, plan.pri, plan.at, plan.d, cfg.decay)
                self._stats.record(plan.d)
        return loss

    def _plan(
        self, batches: list[tuple[dict[str, Any], MemoryConfig, Lists, Any]], skip: Container[int] = ()
    ) -> list[_Plan | None]:
        """Priorities (one batched norm, optional all-reduce, one transfer) and the decisions.

        Groups whose index is in ``skip`` are left out (the whole-step kernel takes them).
        """
        reducer = self._reducer()
        units: list[tuple[Tensor, int]] = []  # every unit of every memory group: the reducer's layout
        unit_group: list[int] = []
        views: list[Tensor] = []
        view_pos: list[int] = []
        entries: list[list[tuple[int, Tensor, int, int, int]]] = [[] for _ in batches]
        key_group: list[bool] = []
        for gi, (group, cfg, lists, _extra) in enumerate(batches):
            key_group.append(cfg.key == "group")
            if cfg.kappa == 0.0 or gi in skip:
                continue
            out = entries[gi]
            index = {id(p): i for i, p in enumerate(lists["params"])}
            # Under a reducer every parameter of the group takes a place, gradient or not, so that
            # the vector has the same layout on every rank; otherwise only those with a gradient.
            for p in group["params"] if reducer is not None else lists["params"]:
                i = index.get(id(p))
                bounds = self._segments.get(id(p))
                if bounds is None:
                    if i is not None:
                        g = lists["grads"][i]
                        view_pos.append(len(units))
                        views.append(mem.local_tensor(g))
                        out.append((len(units), p, i, 0, -1))
                    units.append((p, 0))
                    unit_group.append(gi)
                    continue
                for si, (start, numel) in enumerate(bounds):
                    if i is not None:
                        g = lists["grads"][i]
                        view_pos.append(len(units))
                        views.append(mem.unit_view(g, start, numel, False))
                        out.append((len(units), p, i, si, start))
                    units.append((p, si))
                    unit_group.append(gi)
        plans: list[_Plan | None] = [None] * len(batches)
        if not units:
            return plans
        sq_local = mem.batched_sq_norms(views) if views else torch.zeros(0, dtype=torch.float64)
        if reducer is None and len(view_pos) == len(units):
            sq = sq_local
        else:
            sq = torch.zeros(len(units), dtype=torch.float64, device=sq_local.device)
            if views:
                sq[torch.tensor(view_pos, device=sq.device)] = sq_local
            if reducer is not None:
                sq = reducer(units, sq)
        norms = sq.sqrt().cpu().numpy()  # the one device-to-host transfer of the step
        groups = np.array(unit_group)
        has = np.zeros(len(units), dtype=bool)
        has[view_pos] = True
        k = mem.group_priorities(norms, groups, has, np.array(key_group)[groups])
        for gi, out in enumerate(entries):
            if not out:
                continue
            cfg = batches[gi][1]
            states = [self.state[p] for _, p, _, _, _ in out]
            rows = [(mem.ledger_of(st, cfg.topc, self._ledgers), si) for st, (_, _, _, si, _) in zip(states, out)]
            pri, at, count, clock = mem.gather(rows)
            d = mem.decide(pri, count, clock, k[[u for u, *_ in out]], cfg)
            plans[gi] = _Plan([(p, i, si, start) for _, p, i, si, start in out], states, rows, pri, at, d)
        return plans

    def _ledger(self, p: Tensor, topc: int) -> mem.Ledger:
        return mem.ledger_of(self.state[p], topc, self._ledgers)

    def _reducer(self) -> mem.NormReducer | None:
        if self.norm_reducer is None and not self._auto_reducer_checked:
            from ..distributed import auto_reducer  # deferred: only sharded runs need torch.distributed

            self.norm_reducer = auto_reducer(self)
            self._auto_reducer_checked = True
        return self.norm_reducer

    # -- eager path ---------------------------------------------------------------------

    def _eager_group(self, group: dict[str, Any], lists: Lists, extra: Any, plan: _Plan | None) -> None:
        params, grads = lists["params"], lists["grads"]
        by_param: dict[int, list[int]] = {}
        if plan is not None:
            for j, (_p, i, _si, _start) in enumerate(plan.units):
                by_param.setdefault(i, []).append(j)
        aggregated = list(grads)
        pending: list[int] = []
        in_flight = 0
        for i, p in enumerate(params):
            g = grads[i]
            js = by_param.get(i)
            a = g
            if js is not None:
                state = plan.states[js[0]]  # type: ignore[union-attr]
                topc = mem.topc_of(state)
                whole = plan.units[js[0]][3] < 0  # type: ignore[union-attr]
                decisions = [(plan.units[j], plan.d.unit(j)) for j in js]  # type: ignore[union-attr]
                a = self._aggregate(g, state, decisions, whole)
                for (_p, _i, _si, start), d in decisions:
                    numel = mem.local_tensor(p).numel() if whole else self._segments[id(p)][_si][1]
                    slots = [mem.unit_view(state[f"memory_{j}"], start, numel, whole) for j in range(topc)]
                    mem.admit(
                        mem.unit_view(g, start, numel, whole),
                        mem.unit_view(state["memory_sum"], start, numel, whole),
                        slots,
                        d,
                    )
            aggregated[i] = a
            pending.append(i)
            if a is not g:
                in_flight += mem.local_tensor(a).numel() * a.element_size()
            if in_flight >= TEMP_BUDGET_BYTES:
                self._update(group, _subset(lists, pending, aggregated), extra)
                pending, in_flight = [], 0
        if pending:
            self._update(group, _subset(lists, pending, aggregated), extra)

    def _aggregate(self, g: Tensor, state: dict[str, Any], decisions: list, whole: bool) -> Tensor:
        if whole:
            return mem.aggregate(g, state["memory_sum"], decisions[0][1], g.dtype)
        # Elements outside every segment (DeepSpeed's alignment padding) take the plain update.
        out = g.clone()
        flat_out, flat_g, flat_s = out.view(-1), g.view(-1), state["memory_sum"].view(-1)
        for (p, _i, si, start), d in decisions:
            numel = self._segments[id(p)][si][1]
            part = mem.aggregate(flat_g.narrow(0, start, numel), flat_s.narrow(0, start, numel), d, g.dtype)
            flat_out.narrow(0, start, numel).copy_(part)
        return out

    # -- single-pass CPU kernel ---------------------------------------------------------

    def _kernel_eligible(self, group: dict[str, Any], cfg: MemoryConfig) -> bool:
        if not self._has_cpu_kernel or group.get("fused") is not None or group.get("foreach") is not None:
            return False
        if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return False
        if cfg.buffer_dtype not in (None, torch.float32, torch.bfloat16):
            return False
        return load_kernel() is not None

    def _run_fast(self, work: list[tuple[dict[str, Any], MemoryConfig, Lists, _Plan]], batches, plans) -> None:
        from .._kernels import adam_step

        ptrs: list[tuple[int, ...]] = []
        numels: list[int] = []
        ints: list[np.ndarray] = []
        floats: list[np.ndarray] = []
        refresh: list[tuple[dict[str, Any], int, int, int, int]] = []
        for group, cfg, lists, plan in work:
            rows = _kernel_rows(plan, lists, bool(group["amsgrad"]), self._segments)
            if rows is None:  # a tensor the kernel does not take (dtype, device, layout): the exact eager path
                gi = next(n for n, b in enumerate(batches) if b[0] is group)
                self._eager_group(group, lists, batches[gi][3], plan)
                continue
            group_ptrs, group_numels = rows
            steps = lists["state_steps"]
            torch._foreach_add_(steps, 1)
            step_of = torch.stack(steps).tolist()
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            # torch's single-tensor Adam computes these in Python floats; so do we, once per distinct step
            coef = {s: (lr / (1 - beta1**s), (1 - beta2**s) ** 0.5) for s in set(step_of)}
            d = plan.d
            n = len(plan.units)
            gi = np.zeros((n, 5), dtype=np.int64)
            gi[:, 0] = d.mode
            gi[:, 1] = (d.mode != mem.MODE_NONE) & (cfg.buffer_dtype == torch.bfloat16)
            gi[:, 2] = bool(group["amsgrad"])
            gi[:, 3] = bool(group["maximize"])
            gi[:, 4] = bool(group.get("decoupled_weight_decay", False))
            gf = np.empty((n, 9), dtype=np.float64)
            gf[:, 0] = d.coef_g
            gf[:, 1] = d.coef_s
            gf[:, 2:7] = (lr, group["weight_decay"], beta1, beta2, group["eps"])
            gf[:, 7:9] = [coef[step_of[i]] for _p, i, _si, _start in plan.units]
            ptrs += group_ptrs
            numels += group_numels
            ints.append(gi)
            floats.append(gf)
            for j in np.flatnonzero(d.refresh):
                refresh.append((plan.states[j], plan.units[j][3], group_numels[j], int(d.count_after[j]), cfg.topc))
        if not ptrs:
            return
        adam_step(
            np.array(ptrs, dtype=np.int64),
            np.concatenate(ints),
            np.concatenate(floats),
            np.array(numels),
            torch.get_num_threads(),
        )
        for state, start, numel, count, topc in refresh:
            whole = start < 0
            start = max(start, 0)
            slots = [mem.unit_view(state[f"memory_{j}"], start, numel, whole) for j in range(topc)]
            mem.refresh_sum(mem.unit_view(state["memory_sum"], start, numel, whole), slots, count)

    # -- whole step in C (one process, no collective) ------------------------------------

    def _fused_table(self, gi: int, group: dict[str, Any], cfg: MemoryConfig, lists: Lists) -> _FusedTable | None:
        """The group's cached kernel columns with this step's addresses, or None if the kernel cannot take it."""
        amsgrad = bool(group["amsgrad"])
        params = lists["params"]
        table = self._fused_tables.get(gi)
        if table is None or not table.still_valid(self, group, cfg, lists, amsgrad):
            table = _FusedTable.build(self, group, cfg, lists, amsgrad)
            self._fused_tables[gi] = table
        if not table.ok:
            return None
        q = table.q
        # Gradients are new tensors every step (zero_grad(set_to_none=True)) and a parameter's storage can
        # be swapped (``p.data = ...``): their addresses are read every step, and checked.
        grad_ptrs = []
        for g in lists["grads"]:
            lg = g if type(g) is Tensor else mem.local_tensor(g)
            if lg.dtype != torch.float32 or lg.device.type != "cpu" or not lg.is_contiguous():
                return None
            grad_ptrs.append(lg.data_ptr())
        param_ptrs = [(p if type(p) in _PLAIN else mem.local_tensor(p)).data_ptr() for p in params]
        if param_ptrs != table.param_ptrs:
            table = _FusedTable.build(self, group, cfg, lists, amsgrad)
            self._fused_tables[gi] = table
            if not table.ok:
                return None
            q = table.q
        q[:, 1] = grad_ptrs
        beta1, beta2 = group["betas"]
        table.floats[:, 2:7] = (group["lr"], group["weight_decay"], beta1, beta2, group["eps"])
        return table

    def _run_whole_step(self, tables: list[_FusedTable]) -> None:
        from .._kernels import adam_fused

        if len(tables) == 1:
            t = tables[0]
            q, ints, floats, numels, slot_ptrs = t.q, t.ints, t.floats, t.numels, t.slot_ptrs
        else:
            # several groups in one call: renumber their priority groups and slot offsets
            q = np.concatenate([t.q for t in tables])
            ints = np.concatenate([t.ints for t in tables])
            floats = np.concatenate([t.floats for t in tables])
            numels = np.concatenate([t.numels for t in tables])
            slot_ptrs = np.concatenate([t.slot_ptrs for t in tables])
            row = slot_off = 0
            for gi, t in enumerate(tables):
                n = len(t.numels)
                ints[row : row + n, 1] += slot_off
                ints[row : row + n, 2] = np.where(ints[row : row + n, 2] >= 0, gi, -1)
                row += n
                slot_off += len(t.slot_ptrs)
        out = adam_fused(q, ints, floats, numels, slot_ptrs, torch.get_num_threads())
        row = 0
        for t in tables:
            n = len(t.numels)
            mode = out[row : row + n, 0]
            admitted = int(np.count_nonzero(mode))
            self._stats.admitted += admitted
            self._stats.rejected += n - admitted
            for j in np.flatnonzero(out[row : row + n, 2]):
                state = t.states[j]
                slots = [mem.local_tensor(state[f"memory_{i}"]) for i in range(t.topc)]
                mem.refresh_sum(mem.local_tensor(state["memory_sum"]), slots, int(t.ledgers[j].count[0]))
            row += n

    # -- base update (per optimizer) ----------------------------------------------------

    def _update(self, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        raise NotImplementedError

    # -- introspection ------------------------------------------------------------------

    def memory_stats(self) -> dict[str, float | int]:
        """Plain numbers about the memory, for logs (admissions/rejections since the last call).

        Keys: ``admissions``, ``rejections``, ``admission_rate``, ``fill`` (stored / capacity),
        ``mean_age`` (steps since storage, over stored gradients), ``memory_bytes`` (slots and
        running sums on this process), ``state_bytes`` (all optimizer state on this process).
        """
        admitted, rejected = self._stats.take()
        stored = capacity = 0
        age_sum = 0
        memory_bytes = state_bytes = 0
        # Walk the state, not param_groups: DeepSpeed ZeRO swaps param_groups in and out around
        # each of its step() calls, so between steps they may not list the parameters.
        for state in self.state.values():
            if not state:
                continue
            state_bytes += _state_bytes(state)
            if "memory_sum" not in state:
                continue
            memory_bytes += mem.memory_bytes(state)
            topc = mem.topc_of(state)
            led = mem.ledger_of(state, topc, self._ledgers)
            for u in range(led.count.shape[0]):
                n = int(led.count[u])
                stored += n
                capacity += topc
                age_sum += int(n * led.clock[u] - led.stored_at[u, :n].sum())
        seen = admitted + rejected
        return {
            "admissions": admitted,
            "rejections": rejected,
            "admission_rate": admitted / seen if seen else 0.0,
            "fill": stored / capacity if capacity else 0.0,
            "mean_age": age_sum / stored if stored else 0.0,
            "memory_bytes": memory_bytes,
            "state_bytes": state_bytes,
        }


class _Stats:
    """Admission counters between two ``memory_stats()`` calls."""

    def __init__(self) -> None:
        self.admitted = 0
        self.rejected = 0

    def record(self, d: mem.Decisions) -> None:
        admitted = int(np.count_nonzero(d.mode))
        self.admitted += admitted
        self.rejected += len(d.mode) - admitted

    def take(self) -> tuple[int, int]:
        out = (self.admitted, self.rejected)
        self.admitted = self.rejected = 0
        return out


@dataclass
class _Plan:
    """One param group's units that have a gradient this step, and their decisions."""

    units: list[tuple[Tensor, int, int, int]]  # (param, index in the group's lists, segment, start or -1)
    states: list[dict[str, Any]]  # optimizer.state[param] per unit
    rows: list[tuple[mem.Ledger, int]]  # ledger rows per unit
    pri: np.ndarray  # gathered ledger rows, updated by the commit
    at: np.ndarray
    d: mem.Decisions


_PLAIN = (Tensor, torch.nn.Parameter)


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _FusedTable:
    """Kernel columns of one param group for ``memopt_adam_fused``, kept between steps.

    Valid while the group holds the same tensors with a gradient, the same state tensors (torch's
    lists from ``_init_group`` are compared by identity) and the same ledgers (a load replaces them and
    bumps the optimizer's layout version); the gradient and parameter addresses are read every step.
    """

    ok: bool

    @classmethod
    def build(
        cls, opt: MemoryAugmentedOptimizer, group: dict[str, Any], cfg: MemoryConfig, lists: Lists, amsgrad: bool
    ) -> _FusedTable:
        from .._kernels import AGGREGATION_CODES

        t = cls()
        t.ok = False
        t.group, t.cfg, t.amsgrad, t.version, t.state_obj = group, cfg, amsgrad, opt._layout_version, opt.state
        t.params = list(lists["params"])
        t.exp_avgs, t.exp_avg_sqs = list(lists["exp_avgs"]), list(lists["exp_avg_sqs"])
        t.maxs, t.steps = list(lists["max_exp_avg_sqs"]), list(lists["state_steps"])
        t.topc = cfg.topc
        t.states = [opt.state[p] for p in t.params]
        t.param_ptrs = []
        n = len(t.params)
        t.q = np.zeros((n, 11), dtype=np.int64)
        t.ints = np.zeros((n, 8), dtype=np.int64)
        t.floats = np.zeros((n, 7), dtype=np.float64)
        t.numels = np.zeros(n, dtype=np.int64)
        t.slot_ptrs = np.zeros(n * cfg.topc, dtype=np.int64)
        t.ledgers, t.anchors, t.keep_alive = [], [], []
        bf16 = cfg.buffer_dtype == torch.bfloat16
        for j, (p, state) in enumerate(zip(t.params, t.states)):
            if id(p) in opt._segments:
                return t
            lp = mem.local_tensor(p)
            tensors = [lp] + [mem.local_tensor(state[k]) for k in ("exp_avg", "exp_avg_sq", "memory_sum")]
            if amsgrad:
                tensors.append(mem.local_tensor(state["max_exp_avg_sq"]))
            slots = [mem.local_tensor(state[f"memory_{i}"]) for i in range(cfg.topc)]
            step = state["step"]
            if (
                any(x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() for x in tensors)
                or any(x.dtype != (torch.bfloat16 if bf16 else torch.float32) or not x.is_contiguous() for x in slots)
                or step.dtype != torch.float32
                or step.device.type != "cpu"
                or step.dim() != 0
            ):
                return t
            led = mem.ledger_of(state, cfg.topc, opt._ledgers)
            if led.count.shape[0] != 1 or not led.priorities.flags.c_contiguous:
                return t
            t.ledgers.append(led)
            t.anchors.append(state["priority_0"])
            t.keep_alive += [*tensors, *slots, step]  # the kernel holds raw addresses of these
            t.param_ptrs.append(lp.data_ptr())
            t.q[j] = (
                lp.data_ptr(),
                0,
                tensors[1].data_ptr(),
                tensors[2].data_ptr(),
                tensors[4].data_ptr() if amsgrad else 0,
                tensors[3].data_ptr(),
                step.data_ptr(),
                led.priorities.ctypes.data,
                led.stored_at.ctypes.data,
                led.count.ctypes.data,
                led.clock.ctypes.data,
            )
            t.slot_ptrs[j * cfg.topc : (j + 1) * cfg.topc] = [x.data_ptr() for x in slots]
            t.ints[j] = (
                cfg.topc,
                j * cfg.topc,
                0 if cfg.key == "group" else -1,
                AGGREGATION_CODES[cfg.aggregation],
                bf16,
                amsgrad,
                bool(group["maximize"]),
                bool(group.get("decoupled_weight_decay", False)),
            )
            t.numels[j] = lp.numel()
        t.floats[:, 0] = cfg.kappa
        t.floats[:, 1] = cfg.decay
        t.ok = True
        return t

    def still_valid(
        self, opt: MemoryAugmentedOptimizer, group: dict[str, Any], cfg: MemoryConfig, lists: Lists, amsgrad: bool
    ) -> bool:
        return (
            self.group is group
            and self.version == opt._layout_version
            and self.state_obj is opt.state
            and self.cfg == cfg
            and self.amsgrad == amsgrad
            and _same(self.params, lists["params"])
            and _same(self.exp_avgs, lists["exp_avgs"])
            and _same(self.exp_avg_sqs, lists["exp_avg_sqs"])
            and _same(self.steps, lists["state_steps"])
            and (not amsgrad or _same(self.maxs, lists["max_exp_avg_sqs"]))
            and (not self.ok or all(st["priority_0"] is a for st, a in zip(self.states, self.anchors)))
        )


def _kernel_rows(
    plan: _Plan, lists: Lists, amsgrad: bool, segments: dict[int, list[tuple[int, int]]]
) -> tuple[list[tuple[int, ...]], list[int]] | None:
    """Addresses (columns of ``memopt_cpu.c``) and sizes of the units, or None if one cannot take the kernel."""
    ptrs: list[tuple[int, ...]] = []
    numels: list[int] = []
    modes, slots = plan.d.mode.tolist(), plan.d.slot.tolist()
    for j, (p, i, si, start) in enumerate(plan.units):
        lp, lg = mem.local_tensor(p), mem.local_tensor(lists["grads"][i])
        if (
            lp.dtype != torch.float32
            or lg.dtype != torch.float32
            or lp.device.type != "cpu"
            or lg.device.type != "cpu"
            or not lp.is_contiguous()
            or not lg.is_contiguous()
        ):
            return None
        state = plan.states[j]
        if start < 0:
            start, numel = 0, lp.numel()
        else:
            numel = segments[id(p)][si][1]
        off = 4 * start
        slot = mem.local_tensor(state[f"memory_{slots[j]}"]) if modes[j] != mem.MODE_NONE else None
        ptrs.append(
            (
                lp.data_ptr() + off,
                lg.data_ptr() + off,
                mem.local_tensor(state["exp_avg"]).data_ptr() + off,
                mem.local_tensor(state["exp_avg_sq"]).data_ptr() + off,
                mem.local_tensor(state["max_exp_avg_sq"]).data_ptr() + off if amsgrad else 0,
                mem.local_tensor(state["memory_sum"]).data_ptr() + off,
                slot.data_ptr() + start * slot.element_size() if slot is not None else 0,
            )
        )
        numels.append(numel)
    return ptrs, numels


def _state_bytes(state: dict[str, Any]) -> int:
    total = 0
    seen: set[int] = set()
    for v in state.values():
        if isinstance(v, Tensor):
            lt = mem.local_tensor(v)
            if lt.dim() == 0 or lt.device.type == "meta":
                continue  # scalars: views into one small host table, negligible
            key = lt.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += lt.numel() * lt.element_size()
    return total


def _subset(lists: Lists, idx: list[int], grads: list[Tensor]) -> Lists:
    n = len(lists["params"])
    out: Lists = {}
    for name, values in lists.items():
        if name == "grads":
            out[name] = [grads[i] for i in idx]
        elif len(values) == n:
            out[name] = [values[i] for i in idx]
        else:  # lists a group does not use (e.g. max_exp_avg_sqs without amsgrad) stay empty
            out[name] = values
    return out


# -- checkpoints ----------------------------------------------------------------------------


def _take_memory_out(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    base, memory = mem.split_memory_state(state_dict.get("state", {}))
    # Saved state is keyed by the ids listed in the saved param_groups, in parameter order; they
    # are 0..N-1 for Optimizer.state_dict() but not for DCP's set_optimizer_state_dict.
    saved_ids = [pid for g in state_dict.get("param_groups", []) for pid in g["params"]]
    optimizer._pending_memory = (memory, saved_ids)
    out = dict(state_dict)
    out["state"] = base
    return out


def _put_memory_back(optimizer: Any) -> None:
    memory, saved_ids = optimizer._pending_memory or ({}, [])
    optimizer._pending_memory = None
    optimizer._ledgers.clear()
    optimizer._layout_version += 1
    # like torch: the i-th saved id belongs to the i-th parameter in param_groups order
    params = [p for g in optimizer.param_groups for p in g["params"]]
    position = {id(p): saved_ids[i] if i < len(saved_ids) else i for i, p in enumerate(params)}
    missing = 0
    for group in optimizer.param_groups:
        cfg = MemoryConfig.from_group(group)
        for p in group["params"]:
            saved = memory.get(position[id(p)])
            state = optimizer.state.get(p)
            if saved is not None:
                mem.restore_memory_state(p, optimizer.state[p], saved, cfg)
            elif state and cfg.kappa > 0.0:
                missing += 1
    if missing:
        mem.warn_missing_memory(missing)
