"""Auto-detection: the one place where an optimizer picks its norm reducer by itself.

The explicit calls are the primary path: ``fsdp1.attach(optimizer, model)``,
``zero.attach(zero_optimizer)``, ``deepspeed.bind(engine)``, ``dtensor.attach(optimizer)``.
An optimizer without a reducer calls :func:`auto_reducer` at its first step (and again after
``add_param_group``). It reads only the parameters it was given, never the call stack or the
heap, imports only the adapter it needs, logs what it found at INFO (logger
``hf_memopt.distributed``) and keeps its state on the optimizer:

* FSDP1 FlatParameters (``use_orig_params=False``): ``ValueError`` naming the fix, always;
* one process, or plain tensors (DDP): no reducer (a checking one under ``HF_MEMOPT_CHECK_RANKS``);
* DTensors (FSDP2 ``fully_shard``, tensor parallel): a reducer over each tensor's process groups;
* FSDP1 original parameters (``use_orig_params=True``): they do not say which process group
  shards them, so ``ValueError`` naming ``fsdp1.attach(optimizer, model)``;
* tensors that look like DeepSpeed ZeRO flat partitions (a ``ds_id``, or plain non-Parameter
  tensors while DeepSpeed is loaded): one warning per optimizer naming ``deepspeed.bind(engine)``;
  each rank then keeps its partition-local norms.

``ZeroRedundancyOptimizer`` cannot be seen from its inner optimizer's parameters (whole,
replicated tensors, as under DDP): ``key="tensor"`` needs nothing, ``key="group"`` needs
``zero.attach(zero_optimizer)``.

Switch it off with ``HF_MEMOPT_AUTO_SHARDING=0`` or ``optimizer.auto_sharding = False`` (the
attribute wins): the optimizer then installs no reducer by itself and a sharded layout without
an explicit call is a ``ValueError`` naming the call (DeepSpeed partitions: the warning).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .._env import env_flag
from . import consistency

if TYPE_CHECKING:
    from ..engine.state import NormReducer

logger = logging.getLogger("hf_memopt.distributed")

#: Environment switch of the auto-detection (default on).
ENV_VAR = "HF_MEMOPT_AUTO_SHARDING"
#: Optimizer attribute that overrides :data:`ENV_VAR` when set (True/False).
ATTRIBUTE = "auto_sharding"
#: Optimizer attribute holding the messages already warned about for that optimizer.
_WARNED_ATTRIBUTE = "_hf_memopt_distributed_warned"

DTENSOR_ATTACH_ERROR = (
    "hf_memopt: the optimizer holds DTensor parameters (FSDP2 fully_shard or tensor parallel) and sharding "
    "auto-detection is off ({why}), so the priorities would be shard-local norms and the ranks would diverge. "
    "Call hf_memopt.distributed.dtensor.attach(optimizer) before the first step, or turn auto-detection on."
)


def enabled(optimizer: Any) -> bool:
    """Whether auto-detection may install a reducer: ``optimizer.auto_sharding`` if set, else the env switch."""
    value = getattr(optimizer, ATTRIBUTE, None)
    if value is not None:
        return bool(value)
    return env_flag(ENV_VAR, True)


def _why_off(optimizer: Any) -> str:
    if getattr(optimizer, ATTRIBUTE, None) is not None:
        return f"optimizer.{ATTRIBUTE} = False"
    return f"{ENV_VAR}=0"


def warn_once(optimizer: Any, message: str, stacklevel: int = 3) -> None:
    """Warn ``message`` once per optimizer (the record lives on the optimizer, not in this module)."""
    seen = optimizer.__dict__.setdefault(_WARNED_ATTRIBUTE, set())
    if message not in seen:
        seen.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def _params(optimizer: Any) -> list[Any]:
    return [p for g in optimizer.param_groups if g.get("kappa", 1.0) > 0.0 for p in g["params"]]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_dtensor(p: Any) -> bool:
    # A DTensor exists only once its module is loaded: nothing to import to check.
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(p, cls)


def _looks_like_deepspeed_partition(p: Any) -> bool:
    """ZeRO-3 marks its flat fp32 partitions with ``ds_id``; ZeRO-1/2 hands plain (non-Parameter) tensors."""
    if hasattr(p, "ds_id"):
        return True
    return "deepspeed" in sys.modules and type(p) is torch.Tensor


def detect(optimizer: Any) -> str:
    """What ``optimizer``'s parameters are: "flat", "dtensor", "fsdp1", "deepspeed" or "plain"."""
    from .fsdp1 import is_flat_param, is_orig_param

    params = _params(optimizer)
    if any(is_flat_param(p) for p in params):
        return "flat"
    if any(_is_dtensor(p) for p in params):
        return "dtensor"
    if any(is_orig_param(p) for p in params):
        return "fsdp1"
    if _distributed() and any(_looks_like_deepspeed_partition(p) for p in params):
        return "deepspeed"
    return "plain"


def auto_reducer(optimizer: Any) -> NormReducer | None:
    """The norm reducer the layout of ``optimizer``'s parameters needs (None: none needed or possible).

    Called by the optimizer at its first step (and again after ``add_param_group``) when it has
    no ``norm_reducer``. Raises ``ValueError`` naming the fix for a layout it cannot serve.
    """
    name = type(optimizer).__name__
    kind = detect(optimizer)
    if kind == "flat":
        from .fsdp1 import USE_ORIG_PARAMS_ERROR

        raise ValueError(USE_ORIG_PARAMS_ERROR)
    if not _distributed():
        logger.info("%s: one process, full tensors: no norm reducer", name)
        return None
    on = enabled(optimizer)
    check = consistency.requested() or bool(getattr(optimizer, "check_rank_consistency", False))
    off = "" if on else f" (auto-detection off: {_why_off(optimizer)})"

    if kind == "dtensor":
        if not on:
            raise ValueError(DTENSOR_ATTACH_ERROR.format(why=_why_off(optimizer)))
        from .dtensor import attach

        reducer = attach(optimizer, check=check)
        logger.info(
            "%s: DTensor parameters (FSDP2/tensor parallel): full-tensor norms all-reduced per process group", name
        )
        return reducer
    if kind == "fsdp1":
        from .fsdp1 import attach_error

        raise ValueError(attach_error("" if on else _why_off(optimizer)))
    if kind == "deepspeed":
        from .deepspeed import NOT_BOUND_WARNING

        logger.info("%s: parameters look like unbound DeepSpeed ZeRO partitions: no norm reducer%s", name, off)
        warn_once(optimizer, NOT_BOUND_WARNING, stacklevel=4)
        return None
    if check:
        from .reducer import ShardedNormReducer
        from .replicated import ReplicatedLayout

        logger.info("%s: replicated tensors (DDP): rank-consistency check only%s", name, off)
        return ShardedNormReducer(optimizer, ReplicatedLayout(), check=True)
    logger.info(
        "%s: replicated tensors (DDP): no norm reducer%s; under ZeroRedundancyOptimizer with key='group' "
        "call hf_memopt.distributed.zero.attach(zero_optimizer)",
        name,
        off,
    )
    return None
