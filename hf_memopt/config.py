"""Hyperparameters of the critical-gradient memory: names, defaults, validation.

One place decides what is a valid ``topc``/``decay``/... so the optimizers, the
``optim_args`` parser and the model cards all agree on the names and the ranges.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch

AGGREGATIONS = ("mean", "sum", "mid")
KEYS = ("group", "tensor")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_ALLOWED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BUFFER_DTYPE_CHOICES = "None, torch.bfloat16, torch.float16, torch.float32 or one of " + ", ".join(
    repr(n) for n in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
)


def parse_buffer_dtype(value: Any) -> torch.dtype | None:
    """Return the ``torch.dtype`` for ``buffer_dtype`` (``None`` keeps the parameter's dtype)."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("none", "null", ""):
            return None
        name = name.removeprefix("torch.")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    elif isinstance(value, torch.dtype) and value in _ALLOWED_DTYPES:
        return value
    raise ValueError(f"buffer_dtype must be {BUFFER_DTYPE_CHOICES}; got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a buffer dtype (``"bf16"``, ``"fp16"``, ``"fp32"``), as ``optim_args`` and cards write it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@dataclass(frozen=True)
class MemoryConfig:
    """The memory hyperparameters of one param group (SPEC section 1).

    Every field is validated on construction; a bad value raises ``ValueError``
    naming the argument and what is allowed.
    """

    topc: int = 10
    decay: float = 0.7
    kappa: float = 1.0
    aggregation: str = "mean"
    key: str = "group"
    buffer_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        topc = self.topc
        # numbers.Integral / numbers.Real: numpy scalars (np.int64(5), np.float32(0.9)) are numbers too
        if isinstance(topc, bool) or not isinstance(topc, numbers.Integral) or int(topc) < 1:
            raise ValueError(f"topc must be an int >= 1 (a Python or numpy integer); got {topc!r}")
        decay = self.decay
        if not _is_real(decay) or not (0.0 < float(decay) <= 1.0):
            raise ValueError(f"decay must be a number with 0 < decay <= 1 (a Python or numpy real); got {decay!r}")
        kappa = self.kappa
        if not _is_real(kappa) or not math.isfinite(float(kappa)) or float(kappa) < 0.0:
            raise ValueError(f"kappa must be a finite number >= 0 (0 turns the memory off); got {kappa!r}")
        if not isinstance(self.aggregation, str) or self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {', '.join(map(repr, AGGREGATIONS))}; got {self.aggregation!r}"
            )
        if not isinstance(self.key, str) or self.key not in KEYS:
            raise ValueError(f"key must be one of {', '.join(map(repr, KEYS))}; got {self.key!r}")
        object.__setattr__(self, "topc", int(topc))
        object.__setattr__(self, "decay", float(decay))
        object.__setattr__(self, "kappa", float(kappa))
        object.__setattr__(self, "buffer_dtype", parse_buffer_dtype(self.buffer_dtype))

    @classmethod
    def from_group(cls, group: dict[str, Any], where: str | None = None) -> MemoryConfig:
        """The validated settings of a param group; ``ValueError`` naming ``where`` (e.g. "param group 1")
        and the key when one is missing or invalid (a user may edit ``param_groups`` between steps)."""
        missing = [f.name for f in fields(cls) if f.name not in group]
        if missing:
            raise ValueError(
                f"{where or 'the param group'} has no {', '.join(missing)}: the memory settings "
                f"({', '.join(f.name for f in fields(cls))}) must stay in every param group"
            )
        try:
            return cls(**{f.name: group[f.name] for f in fields(cls)})
        except ValueError as err:
            if where is None:
                raise
            raise ValueError(f"{where}: {err}") from None

    def as_group_entries(self) -> dict[str, Any]:
        """The values as they are stored in a param group.

        ``buffer_dtype`` is stored by name (``"bfloat16"``...), not as a ``torch.dtype``: param
        groups travel in state dicts, and DCP's ``get_optimizer_state_dict(full_state_dict=True
        / cpu_offload=True)`` rejects a ``torch.dtype`` value ("Unexpected value type").
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.buffer_dtype is not None:
            out["buffer_dtype"] = str(self.buffer_dtype).removeprefix("torch.")
        return out


def _is_real(value: Any) -> bool:
    """A real number: int, float or a numpy integer/floating scalar (not a bool, not a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


MEMORY_ARG_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MemoryConfig))
