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
import numbers
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
    if isinstance(model_or_numel, numbers.Integral) and not isinstance(model_or_numel, bool):
        if model_or_numel < 0:
            raise ValueError(f"model_or_numel: a parameter count must be >= 0; got {model_or_numel!r}")
        return int(model_or_numel)
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
    offload: bool = False,
    model_dtype: torch.dtype | None = None,
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
        offload: the optimizer state lives in host RAM (DeepSpeed ZeRO-Offload,
            ``offload_optimizer.device="cpu"``; FSDP2 ``CPUOffloadPolicy``); only for the strategies
            ``zero1``, ``zero2``, ``zero3`` and ``fsdp2``. ``placement`` then splits device memory from
            host RAM (see Returns).
        model_dtype: dtype of the model's parameters and gradients on the device (default:
            ``param_dtype``), for ``placement`` under ``offload``: DeepSpeed's bf16/fp16 parameters,
            while ``param_dtype`` stays the fp32 the optimizer steps.

    Returns:
        ``{"adamw": bytes, "memopt": bytes, "ratio": memopt / adamw, "per_param": {...},
        "strategy": name, "numel_per_rank": n, "breakdown": {...}}``; every byte count is per rank.
        ``breakdown`` has ``moments``, ``memory_slots``, ``memory_sum`` (the optimizer state) and
        ``params``, ``grads``, ``master`` and ``training_adamw`` / ``training_memopt`` totals.
        ``placement``: ``device_adamw``/``device_memopt`` (accelerator memory that persists between
        steps: parameters and gradients as the strategy keeps them, and without offload everything
        else too) and ``host_adamw``/``host_memopt`` (host RAM: the optimizer state plus the engine's
        own host buffers, itemised in ``host_buffers``). Under ZeRO-Offload DeepSpeed keeps on the host
        an fp32 master partition, an fp32 gradient partition and (ZeRO-1/2) a copy of the partition in
        ``model_dtype`` for the copy back to the device; FSDP2 keeps the sharded parameters and
        gradients there. Not counted: transient buffers of one tensor (DeepSpeed's largest-parameter
        staging buffers, FSDP2's all-gathered layer) and, with gradient accumulation, ZeRO-1/2's fp32
        accumulation buffer on the host (one more ``4 * numel_per_rank`` bytes).
    """
    if isinstance(topc, bool) or not isinstance(topc, numbers.Integral) or topc < 1:
        raise ValueError(f"topc must be an int >= 1 (a Python or numpy integer); got {topc!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
    topc, world_size = int(topc), int(world_size)
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
    model_size = torch.empty((), dtype=model_dtype or param_dtype).element_size()
    device_model = (local(params_sharded) + local(grads_sharded)) * model_size
    placement = _placement(name, offload, n_state, model_size, device_model)
    if placement is None:
        training = params + grads + master
        placement = {"device_base": training, "host_base": 0, "host_buffers": {}}
    base_device, base_host = placement.pop("device_base"), placement.pop("host_base")
    placement.update(
        device_adamw=base_device + (0 if offload else adamw),
        device_memopt=base_device + (0 if offload else memopt),
        host_adamw=base_host + (adamw if offload else 0),
        host_memopt=base_host + (memopt if offload else 0),
    )
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
        "placement": placement,
    }


def _placement(
    name: str, offload: bool, numel_per_rank: int, model_size: int, device_model: int
) -> dict[str, Any] | None:
    """Device and host bytes besides the optimizer state under ``offload``; None without offload.

    ``device_model``: bytes of the parameters and gradients the device keeps under ZeRO.
    """
    if not offload:
        return None
    if name in ("zero1", "zero2", "zero3"):
        # the device keeps the model's parameters and gradients as without offload (ZeRO-3: partitions)
        buffers = {
            "master": numel_per_rank * 4,  # fp32 master partition (DeepSpeed clones it to the host)
            "grads": numel_per_rank * 4,  # fp32 gradient partition the client reads
            "staging": numel_per_rank * model_size if name != "zero3" else 0,  # bit16 copy back to the device
        }
        return {"device_base": device_model, "host_base": sum(buffers.values()), "host_buffers": buffers}
    if name in ("fsdp2", "fsdp"):
        buffers = {"params": numel_per_rank * model_size, "grads": numel_per_rank * model_size}
        return {"device_base": 0, "host_base": sum(buffers.values()), "host_buffers": buffers}
    raise ValueError(
        f"offload=True is modelled for the strategies zero1, zero2, zero3 and fsdp2 (sharded=...); got {name!r}"
    )
