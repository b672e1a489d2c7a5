"""The state an executor may cache between steps, and the check, every step, that it still is what was cached.

The "cpu" and "triton" executors keep raw addresses of a param group's tensors between steps (the C
kernel's columns, the Triton pointer tables). Between two steps a user may do anything torch's own
optimizer survives: replace ``p.data`` or a state tensor's ``.data`` (another size, dtype, device or
storage: ``share_memory_()``, ``optimizer_to(device)`` helpers, Net2Net widening, pruning), put new
tensors into ``optimizer.state[p]``, load a checkpoint of another model, edit group flags such as
``maximize``. An address kept across such an action points at freed or foreign memory.

:func:`state_view` is the one place that sees it. Once per step and param group, before anything is
written, it gathers the tensors whose addresses an executor may keep (the parameters with a gradient,
the base optimizer's state lists, the memory's slots and running sum), and compares them with the
view it returned last time: the same objects, the same data pointers, the parameters' byte sizes, the
same group flags (everything in the group but the parameters and the scalars executors read afresh
each step) and byte sizes (a tensor narrowed in place, ``t.data = t.data[:n]``, keeps its pointer). That
costs a dict lookup, an identity test, a pointer and a size read per tensor; a steady step (nothing but the
gradients changed, :mod:`.snapshot`) skips it, its own check having covered the same. When anything
differs, the new view is
validated (:func:`check_state`: every state tensor shaped like its parameter, on its device), which
raises the error torch's optimizer raises, naming the parameter and the key, before anything is
written; executors then rebuild what they cached, because their tables remember the view they were
built from (``table.view is work.view``).

The gradients are new tensors every step: their shapes are compared with the parameters' every step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from operator import is_, itemgetter
from typing import Any

import torch
from torch import Tensor

from . import state as st

_PLAIN = (Tensor, torch.nn.Parameter)
_SCALARS = (bool, int, float, str, type(None), torch.dtype)

#: group entries every executor reads afresh at each step (so a scheduler that changes them every step
#: does not force a rebuild); the type of ``lr`` and ``betas`` (number or tensor) is part of the flags
PER_STEP_KEYS = frozenset({"params", "lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "alpha"})


def local(t: Tensor) -> Tensor:
    """``t``'s local part (a DTensor's shard), without the call for plain tensors (the per-step path)."""
    return t if type(t) in _PLAIN else st.local_tensor(t)


def group_flags(group: dict[str, Any]) -> tuple[Any, ...]:
    """What an executor may have cached of ``group``'s settings: every entry but the per-step ones (values
    that are not plain numbers, strings or dtypes are compared by identity), and whether lr and betas are
    tensors."""
    out: list[Any] = []
    for k, v in group.items():
        if k in PER_STEP_KEYS:
            continue
        out.append((k, v if type(v) in _SCALARS else id(v)))
    betas = group.get("betas", ())
    out.append(("tensor-lr", isinstance(group.get("lr"), Tensor)))
    out.append(("tensor-betas", any(isinstance(b, Tensor) for b in betas)))
    return tuple(out)


@dataclass(eq=False)
class StateView:
    """One param group's tensors with a gradient in a step, as validated (see the module docstring)."""

    index: int  # the param group's index
    params: list[Tensor]
    tensors: list[Tensor]  # params, then base state, then memory tensors: the objects, for identity
    ptrs: list[int]  # their data pointers (local parts)
    sizes: list[int]  # their byte sizes (``t.data = t.data[:n]`` keeps the pointer)
    flags: tuple[Any, ...]
    #: each executor's verdict on this state (None: it can run it), cached with the view
    verdicts: dict[str, str | None] = field(default_factory=dict)

    def holds(self, tensors: list[Tensor], flags: tuple[Any, ...]) -> bool:
        """Whether ``tensors`` (gathered this step) are the view's: the same objects on the same storages."""
        if len(tensors) != len(self.tensors) or flags != self.flags or not all(map(is_, tensors, self.tensors)):
            return False
        if [local(t).nbytes for t in tensors] != self.sizes:
            return False
        if not self.plain:
            return _ptrs(tensors) == self.ptrs
        return list(map(Tensor.data_ptr, tensors)) == self.ptrs

    @functools.cached_property
    def plain(self) -> bool:
        """No DTensor among them (whose pointers are their local parts')."""
        return all(type(t) in _PLAIN for t in self.tensors)


def _ptrs(tensors: list[Tensor]) -> list[int]:
    return [local(t).data_ptr() for t in tensors]


def _state_lists(work: Any) -> list[list[Any]]:
    """The base optimizer's per-parameter state lists of ``work`` (aligned with its params)."""
    n = len(work.lists["params"])
    return [v for k, v in work.lists.items() if k not in ("params", "grads") and len(v) == n]


@functools.cache
def _memory_getter(topc: int) -> Any:
    """``state -> (memory_0, ..., memory_{topc-1}, memory_sum)`` in one call."""
    return itemgetter(*st.slot_keys(topc), "memory_sum")


def _memory_keys(work: Any) -> list[str]:
    return [*st.slot_keys(work.cfg.topc), "memory_sum"] if work.cfg.kappa > 0.0 else []


def _gather(opt: Any, work: Any) -> list[Tensor]:
    params = work.lists["params"]
    out: list[Tensor] = list(params)
    for lst in _state_lists(work):
        out += [t for t in lst if t is not None]
    if work.cfg.kappa > 0.0:
        get, state = _memory_getter(work.cfg.topc), opt.state
        try:
            for p in params:
                out += get(state[p])
        except KeyError:
            pass  # a memory key missing: check_state names it
    return out


def state_view(opt: Any, work: Any) -> StateView:
    """The validated view of ``work``'s state this step: the cached one when nothing changed, else a new one
    (after :func:`check_state`, which raises on a state that does not fit its parameters)."""
    check_grads(work)
    key = ("state-view", work.index)
    tensors = _gather(opt, work)
    flags = group_flags(work.group)
    cached = opt._engine.cache.get(key)
    if cached is not None and cached.holds(tensors, flags):
        return cached
    check_state(opt, work)
    params = list(work.lists["params"])
    view = StateView(work.index, params, tensors, _ptrs(tensors), [local(t).nbytes for t in tensors], flags)
    opt._engine.cache[key] = view
    return view


def check_counts(opt: Any, work: Any) -> None:
    """Every ``memory_count`` of ``work``'s parameters with a gradient in [0, topc] (host ledgers): slots fill
    in order, so a count past topc would index slots that do not exist. The scalars are the user's to edit
    in place, so this runs every step for groups decided on the host, before anything is written (Critical
    Momenta's momenta included); the C kernel's tables check it before each call, Triton's ``decide``
    clamps it."""
    topc, state, ledgers = work.cfg.topc, opt.state, opt._engine.ledgers
    for p in work.lists["params"]:
        try:
            count = st.ledger_of(state[p], topc, ledgers).count
        except ValueError as err:  # a scalar replaced by hand with one of another size
            raise ValueError(f"{_where(work, p)}: {err}") from None
        if count.min() < 0 or count.max() > topc:
            raise count_error(_where(work, p), int(count[(count < 0) | (count > topc)][0]), topc)


def count_error(place: str, bad: int, topc: int) -> ValueError:
    """The error every executor raises for a ``memory_count`` of ``bad`` outside [0, topc] at ``place``
    (``"param group 0, parameter 3"``), before anything is written."""
    return ValueError(
        f"{place}: its memory_count of {bad} is outside [0, topc={topc}] (the state was edited by hand); "
        "nothing was written"
    )


def check_grads(work: Any) -> None:
    """Every gradient shaped like its parameter (``p.data`` replaced after the backward leaves the old grad)."""
    params, grads = work.lists["params"], work.lists["grads"]
    if all(g.shape == p.shape for p, g in zip(params, grads)):
        return
    for p, g in zip(params, grads):
        if g.shape != p.shape:
            raise RuntimeError(
                f"{_where(work, p)}: its gradient has shape {tuple(g.shape)}, the parameter {tuple(p.shape)} "
                "(p.data was replaced after the backward pass); recompute the gradient"
            )


def check_state(opt: Any, work: Any) -> None:
    """Every state tensor of ``work``'s parameters with a gradient shaped like its parameter and on its device.

    Raises ``RuntimeError`` (what torch's optimizers raise on such a state, only earlier and naming the
    parameter and the key) before anything is written; a missing memory key is a ``ValueError``.
    """
    lists = _state_lists(work)
    keys = _memory_keys(work)
    for i, p in enumerate(work.lists["params"]):
        lp = local(p)
        state = opt.state[p]
        entries = [(None, lst[i]) for lst in lists] + [(k, state.get(k)) for k in keys]
        for key, t in entries:
            if t is None and key is None:
                continue  # e.g. SGD's momentum buffer before its first step
            if t is None:
                raise ValueError(
                    f"{_where(work, p)}: its memory has no {key!r} (topc={work.cfg.topc}); the state was edited "
                    "by hand or loaded from an incompatible checkpoint"
                )
            lt = local(t)
            if key is None:
                key = _key_of(state, t)
                if key == "step" or lt.dim() == 0:
                    continue  # step counters: 0-dim (or [1]) whatever the parameter's shape
            if lt.shape != lp.shape:
                raise RuntimeError(
                    f"{_where(work, p)} has shape {tuple(lp.shape)}, but its optimizer state {key!r} has shape "
                    f"{tuple(lt.shape)}: the parameter was resized or replaced (p.data = ...), or the state comes "
                    "from a checkpoint of another model. torch's optimizers fail on this too; drop this "
                    "parameter's state (del optimizer.state[p]) or build a new optimizer"
                )
            if lt.device != lp.device:
                raise RuntimeError(
                    f"{_where(work, p)} is on {lp.device}, but its optimizer state {key!r} is on {lt.device}; "
                    "move the state with the parameter"
                )


def _key_of(state: dict[str, Any], t: Tensor) -> str:
    return next((k for k, v in state.items() if v is t), "?")


def _where(work: Any, p: Tensor) -> str:
    return where(work.index, work.group, p)


def where(index: int, group: dict[str, Any], p: Tensor) -> str:
    """``"param group 0, parameter 3"``: ``p``'s place in the optimizer's param groups, for error messages."""
    position = next((j for j, q in enumerate(group["params"]) if q is p), "?")
    return f"param group {index}, parameter {position}"


__all__ = [
    "PER_STEP_KEYS",
    "StateView",
    "check_counts",
    "check_grads",
    "check_state",
    "group_flags",
    "local",
    "state_view",
    "where",
]
