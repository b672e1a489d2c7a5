"""What the memory-augmented optimizers share: the ``torch.optim`` surface around the memory engine.

Each optimizer subclasses its torch counterpart (so it takes exactly torch's arguments and builds
torch's state lazily through torch's own ``_init_group``) and this mixin, which adds the memory
hyperparameters, the ``executor`` choice, ``save_memory``, checkpoint hooks and introspection, and
replaces ``step``. The step itself is :func:`hf_memopt.engine.step.run_step`; the base update is a
strategy from :mod:`.updates`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..config import MemoryConfig
from ..engine import checkpoint
from ..engine import state as st
from ..engine.executors import check_executor_name
from ..engine.step import Work, run_step
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
        self._ledgers: dict[int, st.Ledger] = {}
        #: states whose ledger lives on a device (the "triton" executor): id(priority_0) -> (priority_0, ledger, row, units)
        self._device_ledgers: dict[int, tuple[Tensor, Any, int, int]] = {}
        self._segments: dict[int, list[tuple[int, int]]] = {}
        self._stats = _Stats()
        self._ran: dict[int, str] = {}
        self._pending_memory: tuple[dict[Any, dict[str, Any]], list[Any]] | None = None
        #: turns local squared norms into full-tensor ones under sharding; see ``hf_memopt.distributed``
        self.norm_reducer: st.NormReducer | None = None
        self._auto_reducer_checked = False
        #: executors' per-group caches (e.g. the CPU kernel's columns), dropped when the layout changes
        self._executor_cache: dict[Any, Any] = {}
        self._layout_version = 0
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

    def _invalidate_layout(self) -> None:
        """Drop everything cached about the state's layout (after a load, a new group, new segments)."""
        self._layout_version = getattr(self, "_layout_version", 0) + 1
        self._executor_cache = {}
        self._ledgers = {}

    # -- param groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for name, value in getattr(self, "_memory_defaults", {}).items():
            param_group.setdefault(name, value)
        cfg = MemoryConfig.from_group(param_group)  # raises ValueError naming the bad argument
        param_group.update(cfg.as_group_entries())
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            # torch only warns; the memory would then advance one tensor's clock twice per step
            raise ValueError("params: a parameter is listed twice in one param group; list each parameter once")
        param_group["params"] = params
        super().add_param_group(param_group)  # type: ignore[misc]
        self._auto_reducer_checked = False
        self._invalidate_layout()

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
        self._invalidate_layout()

    # -- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step (SPEC section 1, steps 1-5)."""
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
        for index, group in enumerate(self.param_groups):
            cfg = MemoryConfig.from_group(group)
            if cfg.kappa > 0.0 and group.get("differentiable"):
                raise ValueError(
                    "differentiable=True is not supported with the memory on (kappa > 0): admission "
                    "decisions are not differentiable; use kappa=0 or differentiable=False"
                )
            update = self._base_update
            lists: dict[str, list[Any]] = {name: [] for name in update.list_names}
            extra = self._init_group(group, *lists.values())  # type: ignore[attr-defined]
            if cfg.kappa > 0.0:
                for p in lists["params"]:
                    state = self.state[p]
                    if "memory_sum" not in state:
                        if torch.is_complex(p):
                            raise ValueError("complex parameters are not supported with the memory on (kappa > 0)")
                        st.init_state(p, state, cfg, len(st.segments_of(p, self._segments.get(id(p)))))
                        allocated = True
            works.append(Work(index, group, cfg, lists, extra, update))
        run_step(self, works, self.executor)
        if allocated and not self._size_logged:
            self._size_logged = True
            stats = self.memory_stats(reset=False)
            logger.info(
                "hf_memopt: %s holds %.3g GB of optimizer state on this process (%.3g GB of it the memory)",
                type(self).__name__,
                stats["state_bytes"] / 1e9,
                stats["memory_bytes"] / 1e9,
            )
        return loss

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
        bound = self._device_ledgers.get(id(state["priority_0"]))
        if bound is None or bound[0] is not state["priority_0"]:
            return st.ledger_of(state, _ledger_width(state, self._ledgers), self._ledgers)
        _anchor, ledger, row, units = bound
        snap = snapshots.get(id(ledger))
        if snap is None:
            snap = snapshots[id(ledger)] = ledger.snapshot()
        rows = slice(row, row + units)
        return st.Ledger(snap.priorities[rows], snap.stored_at[rows], snap.count[rows], snap.clock[rows], snap.anchor)

    def executor_for(self, group: dict[str, Any] | int) -> str | None:
        """The executor ("torch", "cpu" or "triton") that ran ``group`` (a param group or its index) at the
        last step; None before its first step."""
        index = group if isinstance(group, int) else next(i for i, g in enumerate(self.param_groups) if g is group)
        return self._ran.get(index)

    def memory_stats(self, reset: bool = True) -> dict[str, Any]:
        """Plain numbers about the memory, for logs (admissions/rejections since the last call).

        Keys: ``admissions``, ``rejections``, ``admission_rate``, ``fill`` (stored / capacity),
        ``mean_age`` (steps since storage, over stored gradients), ``memory_bytes`` (slots and
        running sums on this process), ``state_bytes`` (all optimizer state on this process),
        ``executor`` (the executors that ran at the last step, e.g. ``"cpu"`` or ``"cpu,torch"``).
        ``reset=False`` leaves the admission counters running.
        """
        if reset:
            admitted, rejected = self._stats.take()
        else:
            self._stats.drain()
            admitted, rejected = self._stats.admitted, self._stats.rejected
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
            "executor": ",".join(sorted(set(self._ran.values()))),
        }


def _ledger_width(state: dict[str, Any], ledgers: dict[int, st.Ledger]) -> int:
    """C of a parameter's memory: from its cached ledger, else from the slot keys (once per new ledger)."""
    led = ledgers.get(id(state["priority_0"]))
    if led is not None and led.anchor is state["priority_0"]:
        return led.priorities.shape[1]
    topc = 0
    while f"priority_{topc}" in state:
        topc += 1
    return topc


class _Stats:
    """Admission counters between two ``memory_stats()`` calls."""

    def __init__(self) -> None:
        self.admitted = 0
        self.rejected = 0
        #: device counters [admitted, rejected] kept by executors that decide on a device
        self.device: dict[torch.device, Tensor] = {}

    def counters(self, device: torch.device) -> Tensor:
        """The int64 [admitted, rejected] counters on ``device`` (the "triton" executor adds to them)."""
        t = self.device.get(device)
        if t is None:
            t = self.device[device] = torch.zeros(2, dtype=torch.int64, device=device)
        return t

    def drain(self) -> None:
        for t in self.device.values():
            admitted, rejected = t.tolist()  # the transfer, only when memory_stats() is called
            self.admitted += admitted
            self.rejected += rejected
            t.zero_()

    def record(self, modes: np.ndarray) -> None:
        """Count one step's decisions (``modes``: MODE_NONE / MODE_FILL / MODE_EVICT per unit)."""
        admitted = int(np.count_nonzero(modes))
        self.admitted += admitted
        self.rejected += len(modes) - admitted

    def take(self) -> tuple[int, int]:
        self.drain()
        out = (self.admitted, self.rejected)
        self.admitted = self.rejected = 0
        return out
