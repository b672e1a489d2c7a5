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

from collections.abc import Callable
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
                    if torch.is_complex(p):
                        raise ValueError("complex parameters are not supported with the memory on (kappa > 0)")
                    state = self.state[p]
                    if "memory_sum" not in state:
                        mem.init_state(p, state, cfg, len(mem.segments_of(p, self._segments.get(id(p)))))
            batches.append((group, cfg, lists, extra))

        plans = self._plan(batches)
        fast_units: list[tuple[dict[str, Any], Tensor, Tensor, Any, mem.UnitDecision, int, int]] = []
        for (group, cfg, lists, extra), plan in zip(batches, plans):
            if not lists["params"]:
                continue
            if cfg.kappa == 0.0:
                self._update(group, lists, extra)
            elif self._kernel_eligible(group, cfg, lists):
                self._collect_fast(group, lists, plan, fast_units)
            else:
                self._eager_group(group, cfg, lists, extra, plan)
        if fast_units:
            self._run_fast(fast_units)
        for (_group, cfg, lists, _extra), plan in zip(batches, plans):
            if cfg.kappa > 0.0:
                for p in lists["params"]:
                    led = self._ledger(p, cfg.topc)
                    for u, _start, _numel, d in plan[id(p)]:
                        mem.commit(led, u, d, cfg.decay)
                        self._stats.record(d)
        return loss

    def _plan(self, batches: list[tuple[dict[str, Any], MemoryConfig, Lists, Any]]) -> list[dict[int, list]]:
        """Priorities (one batched norm, optional all-reduce, one transfer) and the decisions."""
        units: list[tuple[Tensor, int]] = []
        unit_group: list[int] = []
        unit_key: list[int] = []
        unit_has: list[bool] = []
        views: list[Tensor] = []
        view_pos: list[int] = []
        for gi, (group, cfg, lists, _extra) in enumerate(batches):
            if cfg.kappa == 0.0:
                continue
            grads = {id(p): g for p, g in zip(lists["params"], lists["grads"])}
            # Every parameter of the group takes a place, gradient or not, so that the vector has
            # the same layout on every rank of a sharded run.
            for p in group["params"]:
                g = grads.get(id(p))
                segs = mem.segments_of(p, self._segments.get(id(p)))
                whole = id(p) not in self._segments
                for si, (start, numel) in enumerate(segs):
                    if g is not None:
                        view_pos.append(len(units))
                        views.append(mem.unit_view(g, start, numel, whole))
                    units.append((p, si))
                    unit_group.append(gi)
                    unit_key.append(cfg.key == "group")
                    unit_has.append(g is not None)
        plans: list[dict[int, list]] = [{} for _ in batches]
        if not units:
            return plans
        reducer = self._reducer()
        if views:
            sq_local = mem.batched_sq_norms(views)
        else:
            sq_local = torch.zeros(0, dtype=torch.float64)
        if reducer is None and len(view_pos) == len(units):
            sq = sq_local
        else:
            sq = torch.zeros(len(units), dtype=torch.float64, device=sq_local.device)
            if views:
                sq[torch.tensor(view_pos, device=sq.device)] = sq_local
            if reducer is not None:
                sq = reducer(units, sq)
        norms = sq.sqrt().cpu().numpy()  # the one device-to-host transfer of the step
        has = np.array(unit_has, dtype=bool)
        k = mem.group_priorities(norms, np.array(unit_group), has, np.array(unit_key))
        for ui, (p, si) in enumerate(units):
            if not unit_has[ui]:
                continue
            gi = unit_group[ui]
            cfg = batches[gi][1]
            led = self._ledger(p, cfg.topc)
            start, numel = mem.segments_of(p, self._segments.get(id(p)))[si]
            plans[gi].setdefault(id(p), []).append((si, start, numel, mem.decide(led, si, float(k[ui]), cfg)))
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

    def _eager_group(
        self, group: dict[str, Any], cfg: MemoryConfig, lists: Lists, extra: Any, plan: dict[int, list]
    ) -> None:
        params, grads = lists["params"], lists["grads"]
        aggregated = list(grads)
        pending: list[int] = []
        in_flight = 0
        for i, p in enumerate(params):
            state = self.state[p]
            g = grads[i]
            decisions = plan[id(p)]
            whole = id(p) not in self._segments
            a = self._aggregate(g, state, decisions, whole)
            for _u, start, numel, d in decisions:
                slots = [mem.unit_view(state[f"memory_{j}"], start, numel, whole) for j in range(cfg.topc)]
                n_after = int(self._ledger(p, cfg.topc).count[_u]) + (d.mode == mem.MODE_FILL)
                mem.admit(
                    mem.unit_view(g, start, numel, whole),
                    mem.unit_view(state["memory_sum"], start, numel, whole),
                    slots,
                    n_after,
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

    @staticmethod
    def _aggregate(g: Tensor, state: dict[str, Any], decisions: list, whole: bool) -> Tensor:
        if whole:
            return mem.aggregate(g, state["memory_sum"], decisions[0][3], g.dtype)
        # Elements outside every segment (DeepSpeed's alignment padding) take the plain update.
        out = g.clone()
        flat_out, flat_g, flat_s = out.view(-1), g.view(-1), state["memory_sum"].view(-1)
        for _u, start, numel, d in decisions:
            part = mem.aggregate(flat_g.narrow(0, start, numel), flat_s.narrow(0, start, numel), d, g.dtype)
            flat_out.narrow(0, start, numel).copy_(part)
        return out

    # -- single-pass CPU kernel ---------------------------------------------------------

    def _kernel_eligible(self, group: dict[str, Any], cfg: MemoryConfig, lists: Lists) -> bool:
        if not self._has_cpu_kernel or group.get("fused") is not None or group.get("foreach") is not None:
            return False
        if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return False
        if cfg.buffer_dtype not in (None, torch.float32, torch.bfloat16):
            return False
        for p, g in zip(lists["params"], lists["grads"]):
            lp, lg = mem.local_tensor(p), mem.local_tensor(g)
            if (
                lp.device.type != "cpu"
                or lp.dtype != torch.float32
                or lg.dtype != torch.float32
                or not lp.is_contiguous()
                or not lg.is_contiguous()
            ):
                return False
        return load_kernel() is not None

    def _collect_fast(self, group: dict[str, Any], lists: Lists, plan: dict[int, list], out: list) -> None:
        steps = lists["state_steps"]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        for i, p in enumerate(lists["params"]):
            step = float(steps[i].item())
            for u, start, numel, d in plan[id(p)]:
                out.append((group, p, lists["grads"][i], step, u, d, start, numel))

    def _run_fast(self, units: list) -> None:
        from .._kernels import adam_step

        n = len(units)
        ptrs = np.zeros((n, 7), dtype=np.int64)
        ints = np.zeros((n, 5), dtype=np.int64)
        floats = np.zeros((n, 9), dtype=np.float64)
        numels = np.zeros(n, dtype=np.int64)
        refresh = []
        for r, (group, p, g, step, u, d, start, numel) in enumerate(units):
            state = self.state[p]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            amsgrad = bool(group["amsgrad"])

            def addr(t: Tensor, start: int = start) -> int:
                lt = mem.local_tensor(t)
                return lt.data_ptr() + start * lt.element_size()

            slot = state[f"memory_{d.slot}"] if d.mode != mem.MODE_NONE else None
            ptrs[r] = (
                addr(p),
                addr(g),
                addr(state["exp_avg"]),
                addr(state["exp_avg_sq"]),
                addr(state["max_exp_avg_sq"]) if amsgrad else 0,
                addr(state["memory_sum"]),
                addr(slot) if slot is not None else 0,
            )
            slot_bf16 = slot is not None and slot.dtype == torch.bfloat16
            ints[r] = (
                d.mode,
                slot_bf16,
                amsgrad,
                bool(group["maximize"]),
                bool(group.get("decoupled_weight_decay", False)),
            )
            bc1 = 1 - beta1**step
            bc2 = 1 - beta2**step
            floats[r] = (d.coef_g, d.coef_s, lr, group["weight_decay"], beta1, beta2, group["eps"], lr / bc1, bc2**0.5)
            numels[r] = numel
            if d.refresh:
                refresh.append((p, group["topc"], u, start, numel, d))
        adam_step(ptrs, ints, floats, numels, torch.get_num_threads())
        for p, topc, u, start, numel, d in refresh:
            state = self.state[p]
            whole = id(p) not in self._segments
            n_after = int(self._ledger(p, topc).count[u]) + (d.mode == mem.MODE_FILL)
            slots = [mem.unit_view(state[f"memory_{j}"], start, numel, whole) for j in range(topc)]
            mem.refresh_sum(mem.unit_view(state["memory_sum"], start, numel, whole), slots, n_after)

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

    def record(self, d: mem.UnitDecision) -> None:
        if d.mode == mem.MODE_NONE:
            self.rejected += 1
        else:
            self.admitted += 1

    def take(self) -> tuple[int, int]:
        out = (self.admitted, self.rejected)
        self.admitted = self.rejected = 0
        return out


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
