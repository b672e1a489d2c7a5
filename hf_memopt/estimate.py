"""Bytes per rank of the optimizer state, for AdamW and for a memory-augmented AdamW.

Convention (what ``benchmarks/sharded_memory.py`` measures, and ``memory_stats()["state_bytes"]``
reports): *optimizer state* is the tensors held in ``optimizer.state`` on one rank:

* AdamW: ``exp_avg`` and ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), in the dtype of
  the parameters the optimizer steps: 8 bytes per element for fp32 (12 with amsgrad);
* the memory adds ``topc`` stored gradients in ``buffer_dtype`` plus the fp32 running sum:
  ``topc * sizeof(buffer_dtype) + 4`` bytes per element. The per-slot priorities are a few
  bytes per tensor and are left out.

Not counted there, but returned in ``breakdown`` for a whole-training view: the parameters,
the gradients and, under DeepSpeed with bf16/fp16 parameters, its fp32 master copy. (The
"16 bytes per parameter" often quoted for AdamW is that view under mixed precision: 2 bytes of
bf16 parameter + 2 of gradient + 4 of fp32 master + 8 of moments.)

Under DeepSpeed the client optimizer steps the fp32 master partition, so ``buffer_dtype=None``
means fp32 slots there, whatever the model's dtype: pass ``param_dtype=torch.float32`` and
the ``buffer_dtype`` you configure.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import parse_buffer_dtype

#: what each strategy shards across ranks: (optimizer state, gradients, parameters)
STRATEGIES: dict[str, tuple[bool, bool, bool]] = {
    "none": (False, False, False),
    "ddp": (False, False, False),
    "zero_redundancy": (True, False, False),  # torch's ZeroRedundancyOptimizer: state by parameter
    "zero1": (True, False, False),
    "zero2": (True, True, False),
    "zero3": (True, True, True),
    "fsdp": (True, True, True),
    "fsdp1": (True, True, True),
    "fsdp2": (True, True, True),
}


def _numel(model_or_numel: Any) -> int:
    if isinstance(model_or_numel, int):
        return model_or_numel
    if isinstance(model_or_numel, torch.nn.Module):
        return sum(p.numel() for p in model_or_numel.parameters() if p.requires_grad)
    raise TypeError(f"estimate_memory needs an nn.Module or a parameter count; got {type(model_or_numel).__name__}")


def _strategy(sharded: bool | str, world_size: int) -> str:
    if isinstance(sharded, str):
        name = sharded.lower().replace("-", "").replace(" ", "")
        name = {"zero": "zero3", "deepspeed": "zero3", "fullyshard": "fsdp2"}.get(name, name)
        if name not in STRATEGIES:
            raise ValueError(f"sharded must be a bool or one of {', '.join(sorted(STRATEGIES))}; got {sharded!r}")
        return name
    return "fsdp2" if sharded and world_size > 1 else "none"


def estimate_memory(
    model_or_numel: torch.nn.Module | int,
    topc: int = 10,
    buffer_dtype: torch.dtype | str | None = None,
    world_size: int = 1,
    param_dtype: torch.dtype = torch.float32,
    sharded: bool | str = True,
    amsgrad: bool = False,
    master_weights: bool | None = None,
) -> dict[str, Any]:
    """Per-rank bytes of optimizer state for AdamW and for ``MemoryAugmentedAdamW``.

    Args:
        model_or_numel: the model (its trainable parameters are counted) or a parameter count.
        topc: C, the stored gradients per tensor.
        buffer_dtype: dtype of stored gradients (None: ``param_dtype``), as the optimizer takes it.
        world_size: number of data-parallel ranks.
        param_dtype: dtype of the parameters the optimizer steps (fp32 under DeepSpeed: its master copy).
        sharded: True (FSDP2-like: everything sharded over ``world_size``), False (replicated, DDP) or a
            strategy name: ``ddp``, ``zero_redundancy``, ``zero1``, ``zero2``, ``zero3``, ``fsdp1``, ``fsdp2``.
        amsgrad: AdamW's ``max_exp_avg_sq``.
        master_weights: count an fp32 master copy in ``breakdown`` (default: True for bf16/fp16
            ``param_dtype`` under a ZeRO strategy).

    Returns:
        ``{"adamw": bytes, "memopt": bytes, "ratio": memopt / adamw, "per_param": {...},
        "strategy": name, "numel_per_rank": n, "breakdown": {...}}``; every byte count is per rank.
        ``breakdown`` has ``moments``, ``memory_slots``, ``memory_sum`` (the optimizer state) and
        ``params``, ``grads``, ``master`` and ``training_adamw`` / ``training_memopt`` totals.
    """
    if isinstance(topc, bool) or not isinstance(topc, int) or topc < 1:
        raise ValueError(f"topc must be an int >= 1; got {topc!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size!r}")
    numel = _numel(model_or_numel)
    name = _strategy(sharded, world_size)
    state_sharded, grads_sharded, params_sharded = STRATEGIES[name]
    per_rank = math.ceil(numel / world_size)

    def local(sharded_part: bool) -> int:
        return per_rank if sharded_part and world_size > 1 else numel

    p_size = torch.empty((), dtype=param_dtype).element_size()
    b_dtype = parse_buffer_dtype(buffer_dtype) or param_dtype
    b_size = torch.empty((), dtype=b_dtype).element_size()
    n_state = local(state_sharded)
    moments = n_state * p_size * (3 if amsgrad else 2)
    slots = n_state * b_size * topc
    running_sum = n_state * 4
    if master_weights is None:
        master_weights = p_size < 4 and name.startswith("zero")
    params = local(params_sharded) * p_size
    grads = local(grads_sharded) * p_size
    master = n_state * 4 if master_weights else 0
    adamw = moments
    memopt = moments + slots + running_sum
    return {
        "strategy": name,
        "world_size": world_size,
        "numel": numel,
        "numel_per_rank": n_state,
        "adamw": adamw,
        "memopt": memopt,
        "ratio": memopt / adamw if adamw else math.inf,
        "per_param": {"adamw": adamw / numel if numel else 0.0, "memopt": memopt / numel if numel else 0.0},
        "breakdown": {
            "moments": moments,
            "memory_slots": slots,
            "memory_sum": running_sum,
            "params": params,
            "grads": grads,
            "master": master,
            "training_adamw": params + grads + master + adamw,
            "training_memopt": params + grads + master + memopt,
        },
    }
