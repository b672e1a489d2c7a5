"""Checkpoints of the memory (SPEC section 3): load hooks, and state dicts without the memory.

``Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype (lossy for fp32
priorities and sums next to bf16 parameters, and bf16 slots would come back fp32), so the memory
keys are taken out before it runs and put back, with their own dtypes, after it. The same hooks
check that the checkpoint fits: a memory saved with another ``topc`` is a ``ValueError``; a
checkpoint without memory (a plain ``torch.optim`` one, one saved with ``save_memory=False``, or one
converted by DeepSpeed's universal-checkpoint tool) keeps the base state and starts the memory
empty, with a warning.
"""

from __future__ import annotations

from typing import Any

from ..config import MEMORY_ARG_NAMES, MemoryConfig
from . import state as st


def without_memory(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer ``state_dict`` with the memory left out: its state keys and its param-group
    hyperparameters (``topc``, ``decay``, ...).

    What is left is a checkpoint of the base optimizer, as ``torch.optim`` would write it: loading it
    into a memory-augmented optimizer keeps the moments and steps and starts the memory empty with that
    optimizer's own settings (and a warning); ``torch.optim.AdamW`` can load it too.
    """
    out = dict(state_dict)
    base, _memory = st.split_memory_state(state_dict.get("state", {}))
    out["state"] = base
    out["param_groups"] = [
        {k: v for k, v in g.items() if k not in MEMORY_ARG_NAMES} for g in state_dict.get("param_groups", [])
    ]
    return out


def state_dict_post_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Leave the memory out of ``state_dict()`` when the optimizer was built with ``save_memory=False``."""
    return state_dict if optimizer.save_memory else without_memory(state_dict)


def load_pre_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check the checkpoint against the optimizer and take the memory keys out of it."""
    saved_groups = state_dict.get("param_groups", [])
    groups = []
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
        groups.append(saved)
    base, memory = st.split_memory_state(state_dict.get("state", {}))
    # Saved state is keyed by the ids listed in the saved param_groups, in parameter order; they
    # are 0..N-1 for Optimizer.state_dict() but not for DCP's set_optimizer_state_dict.
    saved_ids = [pid for g in saved_groups for pid in g["params"]]
    optimizer._pending_memory = (memory, saved_ids)
    out = dict(state_dict)
    out["state"] = base
    out["param_groups"] = groups + saved_groups[len(groups) :]
    return out


def load_post_hook(optimizer: Any) -> None:
    """Put the memory back with the dtypes and devices of this run; warn where the checkpoint had none."""
    memory, saved_ids = optimizer._pending_memory or ({}, [])
    optimizer._pending_memory = None
    optimizer._invalidate_layout()
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
