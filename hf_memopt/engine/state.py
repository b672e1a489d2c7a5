"""The memory's state layout (SPEC section 3): keys, allocation, the host ledger, checkpoints.

Layout of one parameter's memory in ``optimizer.state[p]``:

* ``memory_0`` ... ``memory_{C-1}``: the slots, stored gradients shaped like ``p``, ``buffer_dtype``;
* ``priority_0`` ... ``priority_{C-1}``: fp32 priorities; ``stored_at_0`` ...: the unit's clock when
  the slot was written (for ``memory_stats``' age);
* ``memory_sum``: fp32 running sum ``S`` of the stored gradients;
* ``memory_count``: how many slots are filled (slots fill in order, so slot ``i`` is in use iff
  ``i < memory_count``); ``memory_clock``: steps this unit took part in.

The per-slot scalars are 0-dim CPU tensors that are views into one small table per parameter,
the *ledger*; the host reads and writes that table through numpy, so the state is always current.
The scalars are the truth, as a torch optimizer's state tensors are: a ledger is used while every scalar
is still the view it bound (:class:`Binding`); one replaced or given new storage by the user makes the
next step gather the ledger again from what the state holds, on every executor.
A parameter bound to several *segments* (a flat ZeRO partition holding slices of several model
tensors) keeps one ledger row per segment; its scalars are then 1-D.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..config import MemoryConfig
from . import identity

_FIXED_KEYS = ("memory_sum", "memory_count", "memory_clock")


def is_memory_key(key: Any) -> bool:
    """True for the state keys owned by the memory (not by the base optimizer)."""
    if not isinstance(key, str):
        return False
    return key in _FIXED_KEYS or key.startswith(("memory_", "priority_", "stored_at_"))


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` held by this process (a DTensor's local shard, else ``t``)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class NormReducer(Protocol):
    """Turns per-unit local squared norms into full-tensor norms, identically on every rank.

    ``units`` lists ``(param, segment_index)`` for every unit of every memory-enabled
    parameter in a fixed order (units without a gradient on this rank contribute 0).
    Returns fp64 squared norms of the full tensors, one per unit.
    """

    def __call__(self, units: Sequence[tuple[Tensor, int]], local_sq: Tensor) -> Tensor: ...


def scalar_keys(topc: int) -> tuple[str, ...]:
    """The keys of a parameter's ledger scalars: ``priority_0`` (the ledger's cache key) first."""
    return (
        *(f"priority_{i}" for i in range(topc)),
        *(f"stored_at_{i}" for i in range(topc)),
        "memory_count",
        "memory_clock",
    )


@dataclass(eq=False)
class Binding:
    """The scalar tensors a ledger made views of its rows, in :func:`scalar_keys` order, with their data
    pointers and sizes. The state's scalars are the truth; a ledger is a cache of them, used while
    :meth:`holds`."""

    keys: tuple[str, ...]
    objs: list[Tensor]
    ptrs: np.ndarray  # int64
    nbytes: np.ndarray  # int64

    @classmethod
    def of(cls, state: dict[str, Any], topc: int) -> Binding:
        """The binding of ``state``'s scalars as they are now (right after :func:`bind_scalars`)."""
        keys = scalar_keys(topc)
        objs = [state[k] for k in keys]
        return cls(keys, objs, *identity.pointers(objs))

    def holds(self, state: dict[str, Any]) -> bool:
        """Whether every scalar of ``state`` is still the view it was bound as: the same object on the same
        memory (:mod:`.identity`'s rule, in C++ where it is built). A scalar replaced (``state[k] = ...``)
        or given new storage (``state[k].data = ...``, an ``optimizer_to(device)`` helper) is the truth,
        and the next step gathers the ledger from the state."""
        return identity.checker().same_state([state], self.keys, self.objs, self.ptrs, self.nbytes)


@dataclass(eq=False)
class Ledger:
    """Host view (numpy, sharing memory with the state's CPU tensors) of one parameter's scalars."""

    priorities: np.ndarray  # [U, C] float32
    stored_at: np.ndarray  # [U, C] int64
    count: np.ndarray  # [U] int64
    clock: np.ndarray  # [U] int64
    binding: Binding | None  # the state's scalars it is the table of (None: a read-only copy)


def segments_of(p: Tensor, bounds: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """``(start, numel)`` of each unit of ``p`` (one unit covering the whole local tensor by default)."""
    if bounds:
        return list(bounds)
    return [(0, local_tensor(p).numel())]


def unit_view(t: Tensor, start: int, numel: int, whole: bool) -> Tensor:
    """The unit's elements of a parameter-shaped tensor (``t`` itself for a whole-tensor unit)."""
    t = local_tensor(t)
    return t if whole else t.view(-1).narrow(0, start, numel)


def _scalar_view(table: Tensor, i: int, units: int) -> Tensor:
    return table[0, i] if units == 1 else table[:, i]


def _vector_view(vec: Tensor, units: int) -> Tensor:
    return vec[0] if units == 1 else vec


def init_state(p: Tensor, state: dict[str, Any], cfg: MemoryConfig, units: int) -> None:
    """Allocate the memory keys of ``p`` (lazily, from inside ``step``; never for ``kappa == 0``)."""
    dtype = cfg.buffer_dtype or p.dtype
    for i in range(cfg.topc):
        # zeros_like keeps the parameter's kind: a DTensor slot under FSDP2, a flat shard under ZeRO.
        state[f"memory_{i}"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["memory_sum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    bind_scalars(
        state,
        torch.zeros(units, cfg.topc, dtype=torch.float32),
        torch.zeros(units, cfg.topc, dtype=torch.int64),
        torch.zeros(units, dtype=torch.int64),
        torch.zeros(units, dtype=torch.int64),
    )


def bind_scalars(state: dict[str, Any], pri: Tensor, at: Tensor, count: Tensor, clock: Tensor) -> Binding:
    """Point the state's per-slot scalars at rows of ledger tables (``pri``/``at`` [U, C], ``count``/``clock``
    [U]); returns the binding (see :class:`Binding`)."""
    units, topc = pri.shape
    for i in range(topc):
        state[f"priority_{i}"] = _scalar_view(pri, i, units)
        state[f"stored_at_{i}"] = _scalar_view(at, i, units)
    state["memory_count"] = _vector_view(count, units)
    state["memory_clock"] = _vector_view(clock, units)
    return Binding.of(state, topc)


def gather_scalars(
    state: dict[str, Any], topc: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fresh tables (copies on ``device``) of what the state's scalars hold now: priorities [U, C] fp32,
    stored_at [U, C], count [U] and clock [U] int64."""
    anchor = torch.as_tensor(state["priority_0"])
    units = 1 if anchor.dim() == 0 else anchor.shape[0]

    def column(key: str) -> Tensor:
        v = torch.as_tensor(state[key]).detach()
        if v.numel() != units:
            raise ValueError(
                f"optimizer state '{key}' has {v.numel()} element(s), but its parameter's memory has {units} "
                f"unit(s) (priority_0 has shape {tuple(anchor.shape)}): a memory scalar was replaced by hand"
            )
        return v.reshape(units)

    def stack(keys: Sequence[str], dtype: torch.dtype) -> Tensor:
        cols = [column(k) for k in keys]
        if len({(c.device, c.dtype) for c in cols}) == 1:  # one copy, not one per scalar, off a device
            return torch.stack(cols, 1).to(device, dtype)
        return torch.stack([c.to(device, dtype) for c in cols], 1)

    pri = stack([f"priority_{i}" for i in range(topc)], torch.float32)
    at = stack([f"stored_at_{i}" for i in range(topc)], torch.int64)
    count = column("memory_count").to(device, torch.int64).clone()
    clock = column("memory_clock").to(device, torch.int64).clone()
    return pri, at, count, clock


def ledger_of(state: dict[str, Any], topc: int, cache: dict[int, Ledger]) -> Ledger:
    """The numpy ledger of a parameter's state: the cached one while its binding holds, else one gathered
    afresh from the state's scalars (a load, a scalar replaced or given new storage, another executor's
    step: the scalars are the truth) and bound to them."""
    led = cache.get(id(state["priority_0"]))
    if led is not None and led.binding is not None and led.binding.holds(state):
        return led
    cache.pop(id(state["priority_0"]), None)
    pri, at, count, clock = gather_scalars(state, topc)
    binding = bind_scalars(state, pri, at, count, clock)
    led = Ledger(pri.numpy(), at.numpy(), count.numpy(), clock.numpy(), binding)
    cache[id(state["priority_0"])] = led
    return led


def gather(rows: Sequence[tuple[Ledger, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Priorities [U, C], stored_at [U, C], count [U] and clock [U] of the given (ledger, unit) rows."""
    pri = np.stack([led.priorities[u] for led, u in rows])
    at = np.stack([led.stored_at[u] for led, u in rows])
    count = np.array([led.count[u] for led, u in rows], dtype=np.int64)
    clock = np.array([led.clock[u] for led, u in rows], dtype=np.int64)
    return pri, at, count, clock


# ---------------------------------------------------------------------------------------
# Checkpoints: Optimizer.load_state_dict casts every state tensor to the parameter's dtype
# (lossy for fp32 priorities/sums next to bf16 parameters), so the memory keys are taken out
# before it runs and put back, with their own dtypes, after it.


def split_memory_state(state: dict[Any, dict[Any, Any]]) -> tuple[dict[Any, dict[Any, Any]], dict[Any, dict[str, Any]]]:
    """Split a state_dict's ``state`` into (base keys, memory keys) per param id, without mutating it."""
    base: dict[Any, dict[Any, Any]] = {}
    memory: dict[Any, dict[str, Any]] = {}
    for pid, entry in state.items():
        if not isinstance(entry, dict):
            base[pid] = entry
            continue
        base[pid] = {k: v for k, v in entry.items() if not is_memory_key(k)}
        mem = {k: v for k, v in entry.items() if is_memory_key(k)}
        if mem:
            memory[pid] = mem
    return base, memory


def restore_memory_state(p: Tensor, state: dict[str, Any], saved: dict[str, Any] | None, cfg: MemoryConfig) -> bool:
    """Put a saved memory back into ``state`` with the dtypes and devices of this run.

    Returns False (after a warning) when the checkpoint holds no memory for ``p``.
    Raises ``ValueError`` when it was saved with another ``topc``.
    """
    if not saved:
        return False
    saved_topc = sum(1 for k in saved if isinstance(k, str) and k.startswith("priority_"))
    if saved_topc != cfg.topc:
        raise ValueError(
            f"checkpoint memory was saved with topc={saved_topc}, but the optimizer has topc={cfg.topc}; "
            "load it with the same topc (or start a fresh optimizer)"
        )
    dtype = cfg.buffer_dtype or p.dtype
    for i in range(cfg.topc):
        state[f"memory_{i}"] = _to_like(saved[f"memory_{i}"], p, dtype)
    state["memory_sum"] = _to_like(saved["memory_sum"], p, torch.float32)
    pri = torch.stack([torch.as_tensor(saved[f"priority_{i}"]).reshape(-1) for i in range(cfg.topc)], 1)
    units = pri.shape[0]
    at_vals = [saved.get(f"stored_at_{i}", 0) for i in range(cfg.topc)]
    at = torch.stack([torch.as_tensor(v).reshape(-1).expand(units) for v in at_vals], 1)
    count = torch.as_tensor(saved["memory_count"]).reshape(-1).expand(units)
    clock = torch.as_tensor(saved.get("memory_clock", 0)).reshape(-1).expand(units)
    bind_scalars(
        state,
        pri.to("cpu", torch.float32).clone(),
        at.to("cpu", torch.int64).clone(),
        count.to("cpu", torch.int64).clone(),
        clock.to("cpu", torch.int64).clone(),
    )
    return True


def _to_like(value: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    if value.dtype == dtype and value.device == p.device:
        return value
    return value.to(device=p.device, dtype=dtype)


def warn_missing_memory(n_params: int) -> None:
    warnings.warn(
        f"the loaded optimizer state has no critical-gradient memory for {n_params} parameter(s) "
        "(e.g. a checkpoint converted by DeepSpeed's universal-checkpoint tool, or saved by another "
        "optimizer); their memory starts empty",
        stacklevel=4,
    )


def slot_keys(topc: int) -> list[str]:
    """``["memory_0", ..., "memory_{topc-1}"]``."""
    return [f"memory_{i}" for i in range(topc)]


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the local parts of ``tensors``, each storage counted once; 0-dim scalars are left out.

    The one definition of "bytes of optimizer state" (``memory_stats``, the model card, the logs).
    """
    total = 0
    seen: set[int] = set()
    for v in tensors:
        if not isinstance(v, Tensor):
            continue
        lt = local_tensor(v)
        if lt.dim() == 0 or lt.device.type == "meta":
            continue  # scalars: views into one small host table, negligible
        key = lt.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += lt.numel() * lt.element_size()
    return total


def memory_bytes(state: dict[str, Any], topc: int) -> int:
    """Bytes held by the memory of one parameter on this process (slots and running sum)."""
    return tensor_bytes(state[k] for k in ["memory_sum", *slot_keys(topc)] if k in state)


def pooled_steps(steps: Sequence[Tensor]) -> Tensor | None:
    """The one fp32 CPU tensor whose elements ``steps`` are, in order (see :func:`pool_steps`), else None."""
    if not steps:
        return None
    base = steps[0]._base
    if base is None or base.dim() != 1 or base.numel() != len(steps) or base.dtype != torch.float32 or not base.is_cpu:
        return None
    start, size = base.data_ptr(), base.element_size()
    for i, s in enumerate(steps):
        if s._base is not base or s.dim() != 0 or s.data_ptr() != start + i * size:
            return None
    return base


def pool_steps(state: dict[Any, dict[str, Any]], params: Sequence[Tensor], steps: Sequence[Tensor]) -> list[Tensor]:
    """Make the step counters of ``params`` (0-dim fp32 CPU tensors, torch's default) views into one tensor,
    so that a step counts them all with one add (a CPU ``_foreach_add_`` over 148 scalars costs about
    0.5 ms, per tensor). ``state[p]["step"]`` stays a 0-dim fp32 CPU tensor with its value: torch's
    optimizers, checkpoints and users read it as before. Returns the counters (new or unchanged)."""
    plain = (Tensor, torch.nn.Parameter)
    if not steps or pooled_steps(steps) is not None:
        return list(steps)
    if any(
        type(s) not in plain or s.dim() != 0 or s.dtype != torch.float32 or not s.is_cpu or s.requires_grad
        for s in steps
    ):
        return list(steps)
    base = torch.stack([s.detach() for s in steps])
    pooled = list(base.unbind())
    for p, s in zip(params, pooled):
        state[p]["step"] = s
    return pooled
