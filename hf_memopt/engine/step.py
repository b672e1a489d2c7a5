"""One optimizer step over all param groups: pick an executor per group, decide, update, commit.

The order, per SPEC section 1 and section 2's performance contract:

0. every memory group's state is checked against what executors may have cached
   (:func:`.guard.state_view`): a state that no longer fits its parameters raises here, before
   anything is written;
1. every group's executor is picked (:func:`.executors.select_executor`); executors prepare their
   memory groups (Critical Momenta: the momentum is advanced first, because it is what is stored,
   and SPEC 1.3's castability test must see it);
2. groups whose executor decides on the host get their plans together: one batched norm pass,
   one optional all-reduce (sharded runs) and one device-to-host transfer for all of them;
3. each executor runs its groups: aggregate, admit, commit the decisions to the ledgers (admissions
   recorded, priorities decayed), then the base update. The commit comes before the base update so
   that a base update that raises (out of memory, an interrupt caught by the caller) leaves slots,
   S and ledger agreeing (the whole-step kernel decides and commits in its one call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import MemoryConfig
from .executors import select_executor
from .guard import StateView, check_counts, state_view
from .plan import HostPlan, plan_groups

Lists = dict[str, list[Any]]


@dataclass(eq=False)
class Work:
    """One param group in one step: what its executor needs."""

    index: int  # position in optimizer.param_groups
    group: dict[str, Any]
    cfg: MemoryConfig
    lists: Lists  # torch's _init_group lists (params with a gradient, their grads and base state)
    extra: Any  # what _init_group returned (e.g. has_complex), for the base update
    update: Any  # the base update strategy (hf_memopt.optim.updates)
    executor: Any = None
    plan: HostPlan | None = None
    #: the values the memory stores, aligned with ``lists["grads"]``, when they are not the gradients
    #: (Critical Momenta: the momenta, already advanced by the executor's ``prepare``); the plan's
    #: castability test (SPEC 1.3) reads them
    admit: list[Any] | None = None
    #: the group's state as validated this step (memory groups with a gradient; see :mod:`.guard`)
    view: StateView | None = None
    #: set on a steady step (:mod:`.snapshot`: nothing but the gradients changed since the last step, whose
    #: lists, view and executor this work reuses): the gradients' data pointers, aligned with the lists
    grad_ptrs: np.ndarray | None = None

    @property
    def steady(self) -> bool:
        return self.grad_ptrs is not None


def run_step(opt: Any, works: list[Work], requested: str) -> None:
    """Steps 0-3 of the module docstring over ``works`` (every param group of the optimizer)."""
    for w in works:
        if w.cfg.kappa > 0.0 and w.lists["params"] and not w.steady:
            w.view = state_view(opt, w)
    for w in works:
        if not w.steady:  # a steady work keeps last step's executor: what it was chosen on has not changed
            w.executor = select_executor(requested, opt, w)
        opt._engine.ran[w.index] = w.executor.name
    memory = [w for w in works if w.cfg.kappa > 0.0]
    host = [w for w in memory if w.lists["params"] and w.executor.decides_on_host(opt, w)]
    for w in host:
        check_counts(opt, w)  # before prepare: Critical Momenta's writes its momenta
    for executor, group_works in _by_executor(memory):
        executor.prepare(opt, group_works)
    plan_groups(opt, host, opt.norm_reducer, memory)
    for executor, group_works in _by_executor(works):
        executor.run(opt, group_works)


def _by_executor(works: list[Work]) -> list[tuple[Any, list[Work]]]:
    """The works that have parameters with a gradient, grouped by executor (in first-seen order)."""
    out: dict[int, tuple[Any, list[Work]]] = {}
    for w in works:
        if w.lists["params"]:
            out.setdefault(id(w.executor), (w.executor, []))[1].append(w)
    return list(out.values())
