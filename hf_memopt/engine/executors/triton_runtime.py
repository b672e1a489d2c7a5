"""Loading Triton for the "triton" executor: its kernels, whether they run here, and their dtypes.

Triton is imported only when the executor first runs (a second of import). ``@triton.jit`` picks
compiled or interpreted kernels when :mod:`.triton_kernels` is imported, by ``TRITON_INTERPRET``;
:func:`runs_on` answers for the mode that was picked.
"""

from __future__ import annotations

import os
from typing import Any

import torch

INTERPRET_ENV = "TRITON_INTERPRET"

_kernels: Any = None
_kernels_error: str | None = None
_interpreted = False


def kernels() -> Any:
    """The kernel module (imports Triton on first use), or None when Triton cannot be imported."""
    global _kernels, _kernels_error, _interpreted
    if _kernels is None and _kernels_error is None:
        try:
            from . import triton_kernels
        except Exception as exc:  # ImportError, or a Triton that fails to initialise
            _kernels_error = f"{type(exc).__name__}: {exc}"
        else:
            _kernels = triton_kernels
            # @triton.jit chose compiled or interpreted kernels when the module was imported
            _interpreted = os.environ.get(INTERPRET_ENV, "0") == "1"
    return _kernels


def triton_unavailable() -> str | None:
    """Why Triton cannot run here (None: it can)."""
    if kernels() is None:
        return (
            f"Triton cannot be imported ({_kernels_error}); it comes with CUDA builds of torch, or `pip install triton`"
        )
    return None


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run tensors of ``device`` (CUDA; the CPU only under the interpreter)."""
    if kernels() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreted)


_TL: dict[torch.dtype, Any] = {}


def tl_dtype(dtype: torch.dtype) -> Any:
    """The Triton dtype of a torch dtype (float32, bfloat16, float16)."""
    if not _TL:
        tl = kernels().tl
        _TL.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return _TL[dtype]
