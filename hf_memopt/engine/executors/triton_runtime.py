"""Loading Triton for the "triton" executor: its kernels, whether they run here, and their dtypes.

Triton is imported only when the executor first runs (a second of import). ``@triton.jit`` picks
compiled or interpreted kernels when :mod:`.triton_kernels` is imported, by ``TRITON_INTERPRET``;
:func:`runs_on` answers for the mode that was picked.

Supported Triton: :data:`SUPPORTED` (3.6.0, what torch 2.11's CUDA wheels require, up to the 3.9 series,
the newest tested; CI compiles every kernel for sm_80 and sm_90 with both ends). Outside that range, or
where Triton cannot be imported, the executor is unavailable: "auto" then runs CUDA parameters on the
"torch" executor (logged once) and ``executor="triton"`` says why. Where ``$HF_MEMOPT_REQUIRE_EXECUTORS``
names "triton" (CI), the same causes raise :class:`TritonUnavailableError` instead.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..._env import REQUIRE_EXECUTORS_ENV, required_executors

INTERPRET_ENV = "TRITON_INTERPRET"
#: the Triton versions the kernels are compiled and tested with: ``lowest <= version < below``
SUPPORTED = ((3, 6, 0), (3, 10, 0))

_kernels: Any = None
_kernels_error: str | None = None
_interpreted = False


class TritonUnavailableError(RuntimeError):
    """Triton is required (``$HF_MEMOPT_REQUIRE_EXECUTORS``) but cannot run the kernels here."""


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"3.6.0+git1234"`` -> ``(3, 6, 0)``: the leading release numbers of a version string."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    if not numbers:
        raise ValueError(f"Triton version {version!r} has no release number")
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def unsupported_version(version: str) -> str | None:
    """Why Triton ``version`` is outside :data:`SUPPORTED` (None: it is inside)."""
    lowest, below = SUPPORTED
    found = version_tuple(version)
    if lowest <= found < below:
        return None
    span = f">= {'.'.join(map(str, lowest))}, < {'.'.join(map(str, below))}"
    return f"Triton {version} is outside the supported range ({span})"


def interpreter_defect(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter itself cannot be trusted with these versions (None: it can).

    Triton 3.6's interpreter fails with numpy >= 2.4 (``only 0-dimensional arrays can be converted to
    Python scalars``, raised inside ``triton/runtime/interpreter.py``); 3.7 and later run. Its rounding of
    ``tl.fma`` (twice, where the GPU and 3.9's interpreter round once) is a narrower defect: see
    :func:`fma_rounded_twice`."""
    if version_tuple(triton_version) < (3, 7, 0) and version_tuple(numpy_version) >= (2, 4, 0):
        return (
            f"Triton {triton_version}'s interpreter fails with numpy {numpy_version} (numpy >= 2.4: 'only "
            "0-dimensional arrays can be converted to Python scalars' inside Triton's interpreter; Triton >= 3.7 "
            "or numpy < 2.4 runs it)"
        )
    return None


def fma_rounded_twice(triton_version: str) -> bool:
    """Whether Triton's interpreter rounds ``tl.fma`` twice (a multiply, then an add): 3.6 does; the GPU
    and 3.9's interpreter round once, as torch's CPU ``add_(x, alpha=a)`` does."""
    return version_tuple(triton_version) < (3, 7, 0)


def interpreted_fma_rounded_twice() -> bool:
    """Whether the kernels run under an interpreter that rounds ``tl.fma`` twice (the loaded Triton's: see
    :func:`fma_rounded_twice`): bit-exact comparisons with torch's FMAs do not hold there."""
    k = kernels()
    return k is not None and _interpreted and fma_rounded_twice(k.triton.__version__)


def _load() -> tuple[Any, str | None]:
    try:
        import triton
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return None, f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    why = unsupported_version(triton.__version__)
    if why is not None:
        return None, why
    try:
        from . import triton_kernels
    except Exception as exc:  # a Triton that fails to initialise, or kernels it rejects at definition
        return None, f"the Triton kernels cannot be loaded ({type(exc).__name__}: {exc})"
    return triton_kernels, None


def kernels() -> Any:
    """The kernel module (imports Triton on first use), or None when Triton cannot run it here.

    Raises :class:`TritonUnavailableError` instead of returning None where ``$HF_MEMOPT_REQUIRE_EXECUTORS``
    names "triton"."""
    global _kernels, _kernels_error, _interpreted
    if _kernels is None and _kernels_error is None:
        _kernels, _kernels_error = _load()
        # @triton.jit chose compiled or interpreted kernels when the module was imported
        _interpreted = _kernels is not None and os.environ.get(INTERPRET_ENV, "0") == "1"
    if _kernels is None and "triton" in required_executors():
        raise TritonUnavailableError(f"{REQUIRE_EXECUTORS_ENV} requires the 'triton' executor, but {_kernels_error}")
    return _kernels


def triton_unavailable() -> str | None:
    """Why Triton cannot run here (None: it can). Raises :class:`TritonUnavailableError` where Triton is
    required (see :func:`kernels`)."""
    if kernels() is None:
        return f"{_kernels_error}; it comes with CUDA builds of torch, or `pip install 'triton>=3.6,<3.10'`"
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
