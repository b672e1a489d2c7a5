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


@dataclass
class Ledger:
    """Host view (numpy, sharing memory with the state's CPU tensors) of one parameter's scalars."""

    priorities: np.ndarray  # [U, C] float32
    stored_at: np.ndarray  # [U, C] int64
    count: np.ndarray  # [U] int64
    clock: np.ndarray  # [U] int64
    anchor: Tensor  # the state tensor the views belong to: a load replaces it, forcing a rebind


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


#: one parameter's ledger rows: priorities [U, C], stored_at [U, C], count [U], clock [U]
Tables = tuple[Tensor, Tensor, Tensor, Tensor]


def bind_scalars(
    state: dict[str, Any], pri: Tensor, at: Tensor, count: Tensor, clock: Tensor, keep: frozenset[str] = frozenset()
) -> None:
    """Point the state's per-slot scalars at rows of ledger tables (``pri``/``at`` [U, C], ``count``/``clock`` [U]);
    the keys in ``keep`` are left as they are (see :func:`live_tables`)."""
    units, topc = pri.shape
    for i in range(topc):
        for key, table in ((f"priority_{i}", pri), (f"stored_at_{i}", at)):
            if key not in keep:
                state[key] = _scalar_view(table, i, units)
    for key, vec in (("memory_count", count), ("memory_clock", clock)):
        if key not in keep:
            state[key] = _vector_view(vec, units)


def live_tables(
    state: dict[str, Any], cache: dict[int, Ledger], device_ledgers: dict[int, tuple[Tensor, Any, int, int]]
) -> tuple[Tables, frozenset[str]] | None:
    """The ledger rows the state's scalars are views of, when its anchor (``priority_0``) is still bound to a
    live table (a host ledger, or a device ledger of the "triton" executor), and the scalar keys that no
    longer are such views (given new storage or replaced by hand). None: not bound (a load, a state moved
    with ``.data =``), and the state's scalars are the truth.

    A ledger moving between executors is copied from these rows, not from the scalars: the table is the
    truth (docs/design.md), and a scalar that left it keeps its own (stale) tensor, as it does where no
    executor changes."""
    anchor = state["priority_0"]
    led = cache.get(id(anchor))
    tables: Tables | None = None
    if led is not None and bound(led, anchor):
        tables = tuple(torch.from_numpy(a) for a in (led.priorities, led.stored_at, led.count, led.clock))  # type: ignore[assignment]
    else:
        entry = device_ledgers.get(id(anchor))
        if entry is not None and entry[0] is anchor:
            _anchor, ledger, r, units = entry
            rows = slice(r, r + units)
            if anchor.data_ptr() == ledger.pri[rows].data_ptr():
                tables = (ledger.pri[rows], ledger.at[rows], ledger.count[rows], ledger.clock[rows])
    if tables is None:
        return None
    pri, at, count, clock = tables
    expected = {"memory_count": count.data_ptr(), "memory_clock": clock.data_ptr()}
    for i in range(pri.shape[1]):
        expected[f"priority_{i}"] = pri.data_ptr() + i * pri.stride(1) * pri.element_size()
        expected[f"stored_at_{i}"] = at.data_ptr() + i * at.stride(1) * at.element_size()
    stale = frozenset(
        k
        for k, ptr in expected.items()
        if not (isinstance(state.get(k), Tensor) and state[k].device == pri.device and state[k].data_ptr() == ptr)
    )
    return tables, stale


def ledger_of(
    state: dict[str, Any],
    topc: int,
    cache: dict[int, Ledger],
    device_ledgers: dict[int, tuple[Tensor, Any, int, int]] | None = None,
) -> Ledger:
    """The numpy ledger of a parameter's state, rebuilt when the state tensors were replaced (a load) or the
    ledger lives on a device (``device_ledgers``: the "triton" executor's, copied from its rows)."""
    anchor = state["priority_0"]
    led = cache.get(id(anchor))
    if led is not None and bound(led, anchor):
        return led
    units = 1 if anchor.dim() == 0 else anchor.shape[0]
    live = live_tables(state, cache, device_ledgers or {})
    keep: frozenset[str] = frozenset()
    if live is not None:  # the table is the truth: copy its rows
        (pri, at, count, clock), keep = live
        pri, at = pri.detach().to("cpu", torch.float32).clone(), at.detach().to("cpu", torch.int64).clone()
        count, clock = count.detach().to("cpu", torch.int64).clone(), clock.detach().to("cpu", torch.int64).clone()
    else:  # gather (copy) whatever the state holds into fresh tables
        pri = torch.stack(
            [state[f"priority_{i}"].detach().to("cpu", torch.float32).reshape(units) for i in range(topc)], 1
        )
        at = torch.stack(
            [state[f"stored_at_{i}"].detach().to("cpu", torch.int64).reshape(units) for i in range(topc)], 1
        )
        count = state["memory_count"].detach().to("cpu", torch.int64).reshape(units).clone()
        clock = state["memory_clock"].detach().to("cpu", torch.int64).reshape(units).clone()
    bind_scalars(state, pri, at, count, clock, keep)
    led = Ledger(pri.numpy(), at.numpy(), count.numpy(), clock.numpy(), state["priority_0"])
    cache.pop(id(anchor), None)
    cache[id(led.anchor)] = led
    return led


def bound(led: Ledger, anchor: Tensor) -> bool:
    """Whether the state's ``priority_0`` is still the view of ``led``'s table it was bound as: the same
    object, on the same memory (``optimizer_to(device)`` helpers give every state tensor new storage with
    ``.data = ...``; the ledger is then gathered again from what the state holds)."""
    return led.anchor is anchor and anchor.data_ptr() == led.priorities.ctypes.data


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
