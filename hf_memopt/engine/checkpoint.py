"""Checkpoints of the memory (SPEC section 3): load hooks, and state dicts without the memory.

``Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype (lossy for fp32
priorities and sums next to bf16 parameters, and bf16 slots would come back fp32), so the memory
keys are taken out before it runs and put back, with their own dtypes, after it.

The pre-hook also checks that the checkpoint fits, before torch's ``load_state_dict`` touches
anything (a refused checkpoint leaves the optimizer exactly as it was):

* a memory saved with another ``topc``, or by an optimizer whose memory holds something else
  (gradients under the Memory-Augmented optimizers, momenta under Critical Momenta), is a
  ``ValueError``;
* every memory value is validated (:func:`validate_memory`): a bad one is a ``ValueError`` naming the
  parameter index and the key;
* other memory settings (``decay``, ``kappa``, ``aggregation``, ``key``, ``buffer_dtype``) than the
  optimizer's: as torch does for ``lr`` and every other hyperparameter, the checkpoint's values are
  loaded and run; a warning names each one that differs.

A checkpoint without memory (a plain ``torch.optim`` one, one saved with ``save_memory=False``, or one
converted by DeepSpeed's universal-checkpoint tool) keeps the base state and starts the memory empty,
with a warning.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor

from ..config import MEMORY_ARG_NAMES, MemoryConfig
from . import state as st

logger = logging.getLogger("hf_memopt")

#: The top-level state-dict entry that says what the memory holds: "gradients" (the Memory-Augmented
#: optimizers) or "momenta" (Critical Momenta, SPEC 1b). Checkpoints without it (older ones, or those a
#: sharded checkpointer rebuilt from ``state`` and ``param_groups`` alone) are checked by their settings.
MEMORY_HOLDS = "memory_holds"

#: The memory settings a checkpoint brings with it (``topc`` is checked separately: it sizes the memory).
_SETTINGS = tuple(name for name in MEMORY_ARG_NAMES if name != "topc")


def memory_holds(optimizer: Any) -> str:
    """What ``optimizer``'s memory stores: ``"momenta"`` (Critical Momenta) or ``"gradients"``."""
    return "momenta" if optimizer._base_update.stores_momentum else "gradients"


def without_memory(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer ``state_dict`` with the memory left out: its state keys and its param-group
    hyperparameters (``topc``, ``decay``, ...).

    What is left is a checkpoint of the base optimizer, as ``torch.optim`` would write it: loading it
    into a memory-augmented optimizer keeps the moments and steps and starts the memory empty with that
    optimizer's own settings (and a warning); ``torch.optim.AdamW`` can load it too.
    """
    out = {k: v for k, v in state_dict.items() if k != MEMORY_HOLDS}
    base, _memory = st.split_memory_state(state_dict.get("state", {}))
    out["state"] = base
    out["param_groups"] = [
        {k: v for k, v in g.items() if k not in MEMORY_ARG_NAMES} for g in state_dict.get("param_groups", [])
    ]
    return out


def state_dict_post_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Say what the memory holds; leave the memory out when the optimizer was built with ``save_memory=False``."""
    if not optimizer.save_memory:
        return without_memory(state_dict)
    state_dict[MEMORY_HOLDS] = memory_holds(optimizer)
    return state_dict


def load_pre_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check the checkpoint against the optimizer and take the memory keys out of it.

    Raises ``ValueError`` (the optimizer unchanged) for a memory of another kind or ``topc``, or a bad
    memory value; warns when the checkpoint's memory settings differ from the optimizer's.
    """
    saved_groups = state_dict.get("param_groups", [])
    _check_memory_kind(optimizer, state_dict)
    groups = []
    differ: list[str] = []
    for i, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if "topc" not in saved:
            # a checkpoint of the base optimizer: keep this optimizer's memory settings
            saved = {**saved, **{k: current[k] for k in MEMORY_ARG_NAMES}}
        elif saved["topc"] != current["topc"]:
            raise ValueError(
                f"the checkpoint's param group {i} has topc={saved['topc']}, but this optimizer's has "
                f"topc={current['topc']}; build the optimizer with topc={saved['topc']}, or load the checkpoint "
                "without its memory (hf_memopt.without_memory(state_dict)) to start an empty memory of the new size"
            )
        else:
            try:
                MemoryConfig.from_group(saved, where=f"the checkpoint's param group {i}")
            except ValueError as err:
                raise ValueError(f"{err}; the checkpoint was not loaded") from None
            differ += [
                f"param group {i}: {k}={saved[k]!r} (this optimizer: {current[k]!r})"
                for k in _SETTINGS
                if k in current and not _same_setting(k, saved[k], current[k])
            ]
        groups.append(saved)
    base, memory = st.split_memory_state(state_dict.get("state", {}))
    # Saved state is keyed by the ids listed in the saved param_groups, in parameter order; they
    # are 0..N-1 for Optimizer.state_dict() but not for DCP's set_optimizer_state_dict.
    saved_ids = [pid for g in saved_groups for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    topcs = [g["topc"] for g, cur in zip(groups, optimizer.param_groups) for _ in cur["params"]]
    for index, (pid, p, topc) in enumerate(zip(saved_ids, params, topcs)):
        if pid in memory:
            validate_memory(index, p, memory[pid], topc)
    if differ:
        message = (
            "the loaded checkpoint's memory settings differ from this optimizer's; as torch.optim does for lr and "
            "every other hyperparameter, the checkpoint's values are loaded and run: "
            + "; ".join(differ)
            + ". To run other values, edit optimizer.param_groups after loading"
        )
        logger.warning("hf_memopt: %s", message)
        warnings.warn(message, stacklevel=3)
    optimizer._engine.pending_memory = (memory, saved_ids)
    out = {k: v for k, v in state_dict.items() if k != MEMORY_HOLDS}
    out["state"] = base
    out["param_groups"] = groups + saved_groups[len(groups) :]
    return out


def _same_setting(name: str, a: Any, b: Any) -> bool:
    if name == "buffer_dtype":
        from ..config import parse_buffer_dtype

        try:
            return parse_buffer_dtype(a) == parse_buffer_dtype(b)
        except ValueError:
            return False
    return bool(a == b)


def _check_memory_kind(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """A memory of gradients is not one of momenta: refuse to cross-load them (SPEC 1 vs 1b)."""
    holds = memory_holds(optimizer)
    saved = state_dict.get(MEMORY_HOLDS)
    name = type(optimizer).__name__
    fix = (
        f"build the optimizer that wrote it, or load hf_memopt.without_memory(state_dict) to keep the base "
        f"optimizer's state and start {name}'s memory empty"
    )
    if saved is not None and saved != holds:
        raise ValueError(f"the checkpoint's memory holds {saved}, but {name}'s memory holds {holds}; {fix}")
    if saved is None and holds == "momenta":
        from ..optim.critical_momenta import CM_AGGREGATION

        for i, group in enumerate(state_dict.get("param_groups", [])):
            if "aggregation" in group and group["aggregation"] != CM_AGGREGATION:
                raise ValueError(
                    f"the checkpoint's param group {i} has aggregation={group['aggregation']!r}: it was written by "
                    f"an optimizer whose memory holds gradients, but {name}'s memory holds momenta; {fix}"
                )


def validate_memory(index: int, p: Tensor, saved: dict[str, Any], topc: int) -> None:
    """Check one parameter's saved memory against the parameter (SPEC section 3) before anything is loaded.

    ``index``: the parameter's position in ``param_groups`` order (as torch numbers saved state);
    ``topc``: its group's C. Raises ``ValueError`` naming the parameter index and the key.
    """

    def bad(key: str, why: str) -> ValueError:
        return ValueError(
            f"the checkpoint's memory of parameter {index} (shape {tuple(p.shape)}) is not valid: {key} {why}; "
            "the checkpoint was not loaded (hf_memopt.without_memory(state_dict) loads it with an empty memory)"
        )

    saved_topc = sum(1 for k in saved if isinstance(k, str) and k.startswith("priority_"))
    if saved_topc != topc:
        raise ValueError(
            f"the checkpoint's memory of parameter {index} was saved with topc={saved_topc} (priority_0 ... "
            f"priority_{saved_topc - 1}), but its param group has topc={topc}; build the optimizer with "
            f"topc={saved_topc}, or load hf_memopt.without_memory(state_dict) to start an empty memory of the new size"
        )
    for key in (*st.slot_keys(topc), "memory_sum", "memory_count", *(f"priority_{i}" for i in range(topc))):
        if key not in saved:
            raise bad(key, "is missing")
    extra = sorted(k for k in saved if k.startswith(("memory_", "priority_", "stored_at_")) and _slot_index(k) >= topc)
    if extra:
        raise bad(extra[0], f"is beyond topc={topc} (slots memory_0 ... memory_{topc - 1})")
    for key in (*st.slot_keys(topc), "memory_sum"):
        value = saved[key]
        if not isinstance(value, Tensor):
            raise bad(key, f"is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise bad(key, f"has dtype {value.dtype}; a real floating-point dtype is needed")
        if tuple(value.shape) != tuple(p.shape):
            raise bad(key, f"has shape {tuple(value.shape)}; the parameter's shape is needed")
    count = _values(saved["memory_count"])
    if count is None:
        raise bad("memory_count", f"is {_describe(saved['memory_count'])}; integers are needed")
    units = len(count)
    if units < 1 or any(not 0 <= n <= topc for n in count):
        raise bad("memory_count", f"is {count}; each value must be in [0, topc={topc}]")
    for i in range(topc):
        key = f"priority_{i}"
        value = saved[key]
        if not isinstance(value, (Tensor, int, float)) or isinstance(value, bool):
            raise bad(key, f"is {_describe(value)}; a number or a float tensor is needed")
        t = torch.as_tensor(value)
        if t.is_complex() or t.numel() != units:
            raise bad(key, f"is {_describe(value)}; {units} real value(s) are needed (one per memory_count)")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            # a slot's priority is a decayed norm: finite and >= 0 (an empty slot holds 0)
            raise bad(key, f"is {t.tolist()}; priorities are finite and >= 0")
    for key in [f"stored_at_{i}" for i in range(topc)] + ["memory_clock"]:
        if key in saved:  # optional: checkpoints of older releases lack them (they start at 0)
            values = _values(saved[key])
            if values is None or len(values) not in (1, units) or any(v < 0 for v in values):
                raise bad(key, f"is {_describe(saved[key])}; integers >= 0, one per memory_count, are needed")


def _slot_index(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _values(value: Any) -> list[int] | None:
    """The integers held by a count-like entry (a Python int or an integer-valued tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if not isinstance(value, Tensor) or value.is_complex() or value.dtype == torch.bool:
        return None
    flat = value.detach().reshape(-1).cpu()
    if flat.is_floating_point():
        if not bool(torch.isfinite(flat).all()) or not bool((flat == flat.round()).all()):
            return None
    return [int(v) for v in flat.tolist()]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        shown = value.tolist() if value.numel() <= 8 else f"{value.numel()} elements"
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} ({shown})"
    return f"{value!r} ({type(value).__name__})"


def load_post_hook(optimizer: Any) -> None:
    """Put the memory back with the dtypes and devices of this run; warn where the checkpoint had none."""
    memory, saved_ids = optimizer._engine.pending_memory or ({}, [])
    optimizer._engine.pending_memory = None
    optimizer._engine.invalidate()
    optimizer._engine.group_settings.clear()  # the groups are new dicts: what was seen of the old ones is void
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
                st.restore_memory_state(p, optimizer.state[p], saved, cfg)
            elif state and cfg.kappa > 0.0:
                missing += 1
    if missing:
        st.warn_missing_memory(missing)


__all__ = [
    "MEMORY_HOLDS",
    "load_post_hook",
    "load_pre_hook",
    "state_dict_post_hook",
    "validate_memory",
    "without_memory",
]
