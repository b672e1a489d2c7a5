"""A param group as the last step left it, and the check that lets the next step reuse it.

Between two training steps usually nothing changes but the gradients. Yet a step rebuilt everything it
reads: torch's ``_init_group`` walks every parameter's state dict (about 0.27 ms for GPT-2-small's 148
tensors on a slow CPU), the state guard gathers and compares every tensor an executor addresses, and
the executors re-derive their tables' inputs. On a GPU, where the kernels are a few launches, that host
work is the step's cost.

A :class:`Snapshot`, taken at the end of a step whose group ran on a fast executor ("cpu" or "triton"),
records what the next step would read: the group's parameter list, which of them have gradients, every
state dict entry ``_init_group`` and the memory read (the objects), and the data pointer and byte size of
every tensor a kernel may address. :meth:`Snapshot.holds` checks all of it at the next step and, when
nothing changed, hands back the fresh gradients; the step then reuses last step's lists, state view and
executor (:class:`hf_memopt.engine.step.Work` ``steady``). Anything else (a ``.data`` swap, a replaced
state entry or state dict, a parameter added, reordered or without a gradient, an edited group flag, a
load, a gradient of another shape, dtype, device or layout) makes it fail, and the step takes the full
path: ``_init_group``, the state guard (:mod:`.guard`), the executors' own checks.

The check is one rule with two implementations (:mod:`.identity`): C++ against torch's headers
(:mod:`.native_guard`, a few nanoseconds per tensor; built once into the user cache) and Python, used while
the native one is unavailable. ``tests/test_snapshot.py`` holds both to the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import is_
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import identity
from . import state as st
from .guard import StateView, group_flags

_PLAIN = (Tensor, torch.nn.Parameter)


@dataclass(eq=False)
class Snapshot:
    """What a param group's next step reads, as the last step left it (see the module docstring)."""

    members: list[Tensor]  # group["params"], the objects
    params: list[Tensor]  # those with a gradient (the lists' "params")
    param_ptrs: np.ndarray  # their data pointers (int64)
    param_nbytes: np.ndarray  # their byte sizes (int64)
    idle: list[Tensor]  # those without one
    state_obj: Any  # optimizer.state
    state_values: list[dict[str, Any]]  # its values, in order (a replaced per-parameter dict shows here)
    dicts: list[dict[str, Any]]  # optimizer.state[p] for p in params
    sizes: np.ndarray  # how many entries each holds (int64)
    keys: list[Any]  # their keys, dict by dict, in order
    expected: list[Any]  # their values, aligned with ``keys``
    ptrs: np.ndarray  # data pointers of the tensor values, aligned with ``expected`` (int64; -1: not a tensor)
    nbytes: np.ndarray  # their byte sizes
    flags: tuple[Any, ...]  # guard.group_flags of the group
    version: int  # the engine's layout version
    lists: dict[str, list[Any]]  # the group's _init_group lists, "grads" left empty
    extra: Any  # what _init_group returned
    view: StateView  # the state view validated for these lists
    cfg: Any  # the group's MemoryConfig (its settings are among the flags)
    executor: Any  # the executor that ran the group

    def holds(self, opt: Any, group: dict[str, Any]) -> tuple[list[Tensor], np.ndarray] | None:
        """This step's gradients and their data pointers when nothing the step reads changed, else None."""
        if opt.state is not self.state_obj or opt._engine.layout_version != self.version:
            return None
        members = group["params"]
        if len(members) != len(self.members) or not all(map(is_, members, self.members)):
            return None
        if group_flags(group) != self.flags:
            return None
        state = self.state_obj
        if len(state) != len(self.state_values) or not all(map(is_, state.values(), self.state_values)):
            return None
        if any(p.grad is not None for p in self.idle):
            return None
        checker = identity.checker()
        ptrs = np.empty(len(self.params), dtype=np.int64)
        grads = checker.grads(self.params, self.param_ptrs, self.param_nbytes, ptrs)
        if grads is None or not checker.same_entries(
            self.dicts, self.sizes, self.keys, self.expected, self.ptrs, self.nbytes
        ):
            return None
        return grads, ptrs


def take(opt: Any, work: Any) -> Snapshot | None:
    """The snapshot of ``work``'s group as this step left it, or None where the group has no steady form
    (DTensors, a state list whose key is not known, a missing entry). Runs ``_init_group`` once more: the
    lists must be what the next step's ``_init_group`` would build (a base update may have created state)."""
    group, update, cfg = work.group, work.update, work.cfg
    if cfg.kappa == 0.0 or not update.state_keys:
        return None
    members = list(group["params"])
    if not members or any(type(p) not in _PLAIN for p in members):
        return None
    if work.executor.name == "triton" and "state_steps" in update.state_keys:
        # the in-kernel Adam counts steps on the host: one add for the group instead of one per tensor
        st.pool_steps(opt.state, work.lists["params"], work.lists["state_steps"])
    lists: dict[str, list[Any]] = {name: [] for name in update.list_names}
    extra = opt._init_group(group, *lists.values())
    params = lists["params"]
    if not params or any(type(g) not in _PLAIN for g in lists["grads"]):
        return None
    with_grad = set(map(id, params))
    read = [key for name, key in update.state_keys.items() if len(lists[name]) == len(params)]
    read += [*st.slot_keys(cfg.topc), "memory_sum", *st.scalar_keys(cfg.topc)]  # the ledger's scalars: its binding
    dicts = [opt.state[p] for p in params]
    if any(k not in d for d in dicts for k in read):
        return None
    # every entry, in order (a superset of what the step reads; walked by position, not looked up by key)
    keys = [k for d in dicts for k in d]
    expected = [v for d in dicts for v in d.values()]
    for name, key in update.state_keys.items():
        if len(lists[name]) == len(params) and not all(d[key] is v for d, v in zip(dicts, lists[name])):
            return None  # the list does not read the key this module assumes
    if any(isinstance(v, Tensor) and type(v) not in _PLAIN for v in expected):
        return None
    from .guard import state_view
    from .step import Work  # the step module's Work; imported here, as the step imports the optimizer's modules

    view = state_view(opt, Work(work.index, group, cfg, lists, extra, update))
    ptrs, nbytes = identity.pointers(expected)
    lists = dict(lists, grads=[])
    return Snapshot(
        members=members,
        params=params,
        param_ptrs=np.array([p.data_ptr() for p in params], dtype=np.int64),
        param_nbytes=np.array([p.nbytes for p in params], dtype=np.int64),
        idle=[p for p in members if id(p) not in with_grad],
        state_obj=opt.state,
        state_values=list(opt.state.values()),
        dicts=dicts,
        sizes=np.array([len(d) for d in dicts], dtype=np.int64),
        keys=keys,
        expected=expected,
        ptrs=ptrs,
        nbytes=nbytes,
        flags=group_flags(group),
        version=opt._engine.layout_version,
        lists=lists,
        extra=extra,
        view=view,
        cfg=cfg,
        executor=work.executor,
    )


__all__ = ["Snapshot", "take"]
