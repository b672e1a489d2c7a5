"""What the memory-augmented optimizers share: the ``torch.optim`` surface around the memory engine.

Each optimizer subclasses its torch counterpart (so it takes exactly torch's arguments and builds
torch's state lazily through torch's own ``_init_group``) and this mixin, which adds the memory
hyperparameters, the ``executor`` choice, ``save_memory``, checkpoint hooks and introspection, and
replaces ``step``. The step itself is :func:`hf_memopt.engine.step.run_step`; the base update is a
strategy from :mod:`.updates`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import MemoryConfig
from ..engine import checkpoint, snapshot
from ..engine import state as st
from ..engine.context import EngineState
from ..engine.executors import check_executor_name
from ..engine.step import Work, run_step
from ..integrations.deepspeed_guard import guard_accelerate_swap
from .updates import BaseUpdate

logger = logging.getLogger("hf_memopt")


class MemoryAugmentedOptimizer:
    """Mixin: the critical-gradient memory on top of a ``torch.optim`` optimizer."""

    #: the base optimizer's update (set by each optimizer class)
    _base_update: ClassVar[BaseUpdate]

    state: Any
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def _setup_memory(self, memory: MemoryConfig, executor: str = "auto", save_memory: bool = True) -> None:
        """Keep the validated memory defaults, check ``executor`` and ``save_memory``; call before the torch
        counterpart's ``__init__``."""
        self._memory_defaults = memory.as_group_entries()
        #: which executor runs the groups: "auto", "torch", "cpu" or "triton" (not saved in checkpoints)
        self.executor = check_executor_name(executor)
        if not isinstance(save_memory, bool):
            raise ValueError(f"save_memory must be True or False; got {save_memory!r}")
        #: False: ``state_dict()`` leaves the memory out (smaller checkpoints; resume starts it empty)
        self.save_memory = save_memory
        #: the memory engine's bookkeeping (ledgers, segments, executors' caches, counters): one typed object
        self._engine = EngineState()
        #: turns local squared norms into full-tensor ones under sharding; see ``hf_memopt.distributed``
        self.norm_reducer: st.NormReducer | None = None
        self._auto_reducer_checked = False
        self._size_logged = False

    def _finish_setup(self) -> None:
        """Call after the torch counterpart's ``__init__``."""
        self.defaults.update(self._memory_defaults)
        # torch's fused Adam lets GradScaler hand it still-scaled gradients; the memory must see
        # unscaled ones, so GradScaler has to unscale before step().
        self._step_supports_amp_scaling = False
        self.register_load_state_dict_pre_hook(checkpoint.load_pre_hook)  # type: ignore[attr-defined]
        self.register_load_state_dict_post_hook(checkpoint.load_post_hook)  # type: ignore[attr-defined]
        self.register_state_dict_post_hook(checkpoint.state_dict_post_hook)  # type: ignore[attr-defined]
        # a user's own accelerator.prepare() under ZeRO-Offload must not swap this optimizer out silently
        guard_accelerate_swap()

    # -- copies and pickles -------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Everything a copy needs to step exactly as this optimizer does (torch's ``__getstate__`` keeps
        only ``defaults``, ``state`` and ``param_groups``).

        Left out, as torch does: the hooks (the checkpoint hooks are registered again on the copy). Left out
        and rebuilt on the copy: what is keyed by object ids or holds raw addresses (ledger caches, executor
        tables), and the norm reducer, which holds process groups (the copy resolves it again at its first
        step; an adapter that bound one by hand must bind it again). Segments are carried by parameter position.
        """
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in _REBUILT}
        params = [p for g in self.param_groups for p in g["params"]]
        out["_segments_by_position"] = {
            i: list(self._engine.segments[id(p)]) for i, p in enumerate(params) if id(p) in self._engine.segments
        }
        out["_engine_carried"] = self._engine.copy_for({})  # counters and executor names, no object ids
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_segments_by_position" not in state:
            # not a copy: torch's load_state_dict ends with __setstate__({"state": ..., "param_groups": ...})
            super().__setstate__(state)  # type: ignore[misc]
            return
        state = dict(state)
        by_position = state.pop("_segments_by_position")
        carried = state.pop("_engine_carried")
        super().__setstate__(state)  # type: ignore[misc]  # torch: empty hook tables, the step's profiler patch
        params = [p for g in self.param_groups for p in g["params"]]
        self._engine = carried.copy_for({id(params[i]): segs for i, segs in by_position.items() if i < len(params)})
        self.norm_reducer = None
        self._auto_reducer_checked = False
        self.register_load_state_dict_pre_hook(checkpoint.load_pre_hook)  # type: ignore[attr-defined]
        self.register_load_state_dict_post_hook(checkpoint.load_post_hook)  # type: ignore[attr-defined]
        self.register_state_dict_post_hook(checkpoint.state_dict_post_hook)  # type: ignore[attr-defined]

    # -- param groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for name, value in getattr(self, "_memory_defaults", {}).items():
            param_group.setdefault(name, value)
        # raises ValueError naming the bad argument
        cfg = MemoryConfig.from_group(param_group, where=f"param group {len(getattr(self, 'param_groups', []))}")
        param_group.update(cfg.as_group_entries())
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named parameters: (name, tensor)
        if len({id(p) for p in tensors}) != len(tensors):
            # torch only warns; the memory would then advance one tensor's clock twice per step
            raise ValueError(
                f"params: a parameter is listed twice in one param group (group {len(getattr(self, 'param_groups', []))}); "
                "list each parameter once (torch.optim only warns; the memory would store and age it twice per step)"
            )
        param_group["params"] = params
        super().add_param_group(param_group)  # type: ignore[misc]
        self._auto_reducer_checked = False
        self._engine.invalidate()

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
            self._engine.segments[id(param)] = [(int(s), int(n)) for s, n in segments]
        else:
            self._engine.segments.pop(id(param), None)
        self._engine.invalidate()

    # -- the step -----------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step (SPEC section 1, steps 1-5).

        Under ``torch.compile`` the step runs eagerly (a graph break): it decides on host tables (numpy)
        and its fast executors keep raw addresses, none of which Dynamo may trace.
        """
        if torch.compiler.is_compiling():
            from ._eager import eager_step  # imports torch._dynamo: only once something is being compiled

            return eager_step(self, closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        check = getattr(self, "_accelerator_graph_capture_health_check", None)
        if check is not None and "capturable" in self.defaults:  # as torch: SGD has no such flag to check
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Resolved before any state is allocated: a reducer may bind segments (DeepSpeed).
        self._reducer()
        works = []
        allocated = False
        # Every group's settings are checked before anything of any group changes (a step that
        # raises leaves the optimizer as it was).
        # A group whose snapshot holds (hf_memopt.engine.snapshot: nothing the step reads changed since the
        # last step but the gradients, the group's settings included) reuses last step's lists, view and
        # executor. The "torch" executor always takes the full path: it is the reference the others meet.
        steady = self.executor != "torch"
        snaps = [
            self._engine.cache.get(("snapshot", i, self.executor)) if steady else None
            for i in range(len(self.param_groups))
        ]
        fresh_grads = [s.holds(self, g) if s is not None else None for s, g in zip(snaps, self.param_groups)]
        cfgs = [
            snap.cfg if fresh is not None else self._checked_group(index, group)
            for index, (group, snap, fresh) in enumerate(zip(self.param_groups, snaps, fresh_grads))
        ]
        for index, (group, cfg) in enumerate(zip(self.param_groups, cfgs)):
            update = self._base_update
            snap, fresh = snaps[index], fresh_grads[index]
            if fresh is not None:
                lists = dict(snap.lists, grads=fresh[0])
                works.append(Work(index, group, cfg, lists, snap.extra, update, view=snap.view, grad_ptrs=fresh[1]))
                works[-1].executor = snap.executor
                continue
            lists: dict[str, list[Any]] = {name: [] for name in update.list_names}
            extra = self._init_group(group, *lists.values())  # type: ignore[attr-defined]
            if cfg.kappa > 0.0:
                for p in lists["params"]:
                    state = self.state[p]
                    if "memory_sum" not in state:
                        st.init_state(p, state, cfg, len(st.segments_of(p, self._engine.segments.get(id(p)))))
                        allocated = True
            works.append(Work(index, group, cfg, lists, extra, update))
        run_step(self, works, self.executor)
        if steady:
            for w in works:
                if w.grad_ptrs is None and w.executor is not None and w.executor.name in ("cpu", "triton"):
                    self._engine.cache[("snapshot", w.index, self.executor)] = snapshot.take(self, w)
        if allocated and not self._size_logged:
            self._size_logged = True
            # sizes only: memory_stats() would read the device counters (a sync inside the step)
            states = [s for s in self.state.values() if s]
            state_bytes = sum(st.tensor_bytes(s.values()) for s in states)
            memory_bytes = sum(
                st.memory_bytes(s, _ledger_width(s, self._engine.ledgers)) for s in states if "memory_sum" in s
            )
            logger.info(
                "hf_memopt: %s holds %.3g GB of optimizer state on this process (%.3g GB of it the memory)",
                type(self).__name__,
                state_bytes / 1e9,
                memory_bytes / 1e9,
            )
        return loss

    def _checked_group(self, index: int, group: dict[str, Any]) -> MemoryConfig:
        """The group's memory settings, validated; refusals before anything changes; a memory whose size or
        dtype no longer matches an edited ``topc`` / ``buffer_dtype`` is dropped (see :func:`_edited_memory`)."""
        where = f"param group {index}"
        cfg = MemoryConfig.from_group(group, where=where)  # a ValueError naming the group and the key
        memory_on = cfg.kappa > 0.0
        if memory_on and group.get("differentiable"):
            raise ValueError(
                f"{where}: differentiable=True is not supported with the memory on (kappa > 0): admission "
                "decisions are not differentiable; use kappa=0 or differentiable=False"
            )
        seen = (cfg.topc, cfg.buffer_dtype, memory_on, self._engine.layout_version)
        if self._engine.group_settings.get(id(group), (None,))[:4] != seen:
            # once per change of the settings or of the layout (a load, a new group), not per step
            if memory_on and any(torch.is_complex(p) for p in group["params"]):
                raise ValueError(
                    f"{where}: complex parameters are not supported with the memory on (kappa > 0): a priority "
                    "is a real norm of a real gradient; use kappa=0 for this group, or view the parameter as "
                    "real (torch.view_as_real)"
                )
            if _edited_memory(self, index, group, cfg):
                self._engine.invalidate()
            self._engine.group_settings[id(group)] = (
                cfg.topc,
                cfg.buffer_dtype,
                memory_on,
                self._engine.layout_version,
            )
        return cfg

    def _reducer(self) -> st.NormReducer | None:
        if self.norm_reducer is None and not self._auto_reducer_checked:
            from ..distributed import auto_reducer  # deferred: only sharded runs need torch.distributed

            self.norm_reducer = auto_reducer(self)
            self._auto_reducer_checked = True
        return self.norm_reducer

    # -- introspection ------------------------------------------------------------------

    def _stats_ledger(self, state: dict[str, Any], snapshots: dict[int, st.Ledger]) -> st.Ledger:
        """The ledger rows of ``state`` for reading: a copy of a device ledger (one transfer per table per
        call, the state stays bound to the device), else the host ledger."""
        bound = self._engine.device_ledgers.get(id(state["priority_0"]))
        if bound is None or not bound[0].holds(state):
            return st.ledger_of(state, _ledger_width(state, self._engine.ledgers), self._engine.ledgers)
        _binding, ledger, row, units = bound
        snap = snapshots.get(id(ledger))
        if snap is None:
            snap = snapshots[id(ledger)] = ledger.snapshot()
        rows = slice(row, row + units)
        return st.Ledger(snap.priorities[rows], snap.stored_at[rows], snap.count[rows], snap.clock[rows], None)

    def executor_for(self, group: dict[str, Any] | int) -> str | None:
        """The executor ("torch", "cpu" or "triton") that ran ``group`` (one of ``param_groups``, or its index)
        at the last step; None before its first step."""
        if isinstance(group, bool) or not isinstance(group, (int, dict)):
            raise TypeError(f"executor_for takes a param group (a dict of param_groups) or its index; got {group!r}")
        if isinstance(group, dict):
            index = next((i for i, g in enumerate(self.param_groups) if g is group), None)
            if index is None:
                raise ValueError(
                    "executor_for: this dict is not one of optimizer.param_groups (a copy, e.g. dict(group), is not "
                    "the group); pass the group itself or its index"
                )
        else:
            index = int(group)
            if not -len(self.param_groups) <= index < len(self.param_groups):
                raise IndexError(
                    f"executor_for: param group index {index} out of range ({len(self.param_groups)} groups)"
                )
            index %= len(self.param_groups)
        return self._engine.ran.get(index)

    def memory_stats(self, reset: bool = True, reader: str = "user") -> dict[str, Any]:
        """Plain numbers about the memory, for logs.

        Keys: ``admissions``, ``rejections`` (since this ``reader``'s previous call that reset), ``admission_rate``,
        ``fill`` (stored / capacity), ``mean_age`` (steps since storage, over stored gradients), ``memory_bytes``
        (slots and running sums on this process), ``state_bytes`` (all optimizer state on this process),
        ``executor`` (the executors that ran at the last step, e.g. ``"cpu"`` or ``"cpu,torch"``).

        Reading changes nothing for any other reader: each ``reader`` has its own counters (``MemOptTrainer``'s
        logs read as ``"MemOptTrainer"``, so a call from user code takes no counts away from them).
        ``reset=False`` leaves this reader's counters running.
        """
        admitted, rejected = self._engine.stats.since(reader, reset)
        stored = capacity = 0
        age_sum = 0
        memory_bytes = state_bytes = 0
        # Walk the state, not param_groups: DeepSpeed ZeRO swaps param_groups in and out around
        # each of its step() calls, so between steps they may not list the parameters. C is read from
        # the ledger's width, never from a scan of the state's keys.
        snapshots: dict[int, st.Ledger] = {}
        for state in self.state.values():
            if not state:
                continue
            state_bytes += st.tensor_bytes(state.values())
            if "memory_sum" not in state:
                continue
            led = self._stats_ledger(state, snapshots)
            topc = led.priorities.shape[1]
            memory_bytes += st.memory_bytes(state, topc)
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
            "executor": ",".join(sorted(set(self._engine.ran.values()))),
        }


#: attributes not carried by copies and pickles: rebuilt from the state (see ``__getstate__``)
_REBUILT = frozenset({"_engine", "norm_reducer", "_auto_reducer_checked"})


def _edited_memory(opt: MemoryAugmentedOptimizer, index: int, group: dict[str, Any], cfg: MemoryConfig) -> bool:
    """Drop the memory of ``group``'s parameters when ``topc`` or ``buffer_dtype`` was edited in the group since
    it was allocated, with a warning; True when something was dropped.

    The memory then starts empty at this step with the new settings, exactly as a fresh optimizer loaded with
    ``hf_memopt.without_memory(state_dict)`` would (the base optimizer's state is kept). Resizing the slots in
    place could not keep the rule: the stored gradients were ranked against ``topc`` others, and a cast of
    the stored values is not what admitting them in the new dtype would have stored.
    """
    previous = opt._engine.group_settings.get(id(group))
    if previous is not None and previous[3] != opt._engine.layout_version:
        previous = None  # recorded before a load or a new group: not this group's history
    changed: dict[str, tuple[Any, Any]] = {}
    states = []
    for p in group["params"]:
        state = opt.state.get(p)
        if not state or "memory_sum" not in state:
            continue
        states.append(state)
        topc = _ledger_width(state, {})
        if topc != cfg.topc:
            changed["topc"] = (topc, cfg.topc)
        slot_dtype = state["memory_0"].dtype if "memory_0" in state else None
        if cfg.buffer_dtype is not None and slot_dtype != cfg.buffer_dtype:
            changed["buffer_dtype"] = (slot_dtype, cfg.buffer_dtype)
        elif cfg.buffer_dtype is None and previous is not None and previous[1] is not None:
            changed["buffer_dtype"] = (previous[1], None)  # edited back to "the parameter's dtype"
    if not changed:
        return False
    for state in states:
        opt._engine.device_ledgers.pop(id(state.get("priority_0")), None)
        for key in [k for k in state if st.is_memory_key(k)]:
            del state[key]
    edits = ", ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in changed.items())
    warnings.warn(
        f"param group {index}: {edits} was edited in param_groups after the memory was allocated: the memory of "
        f"its {len(states)} parameter(s) starts empty at this step with the new settings, as a fresh optimizer "
        "loaded with hf_memopt.without_memory(state_dict) would (the base optimizer's state is kept)",
        stacklevel=4,
    )
    return True


def _shown(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return "None (the parameter's dtype)" if value is None else str(value)


def _ledger_width(state: dict[str, Any], ledgers: dict[int, st.Ledger]) -> int:
    """C of a parameter's memory: from its cached ledger, else from the slot keys (once per new ledger)."""
    led = ledgers.get(id(state["priority_0"]))
    if led is not None and led.binding is not None and led.binding.objs[0] is state["priority_0"]:
        return led.priorities.shape[1]
    topc = 0
    while f"priority_{topc}" in state:
        topc += 1
    return topc
