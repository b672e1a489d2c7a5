"""Loader of the single-pass CPU kernel (``memopt_cpu.c``).

Built once with the system C compiler into the user cache (about a second), keyed by the
source, the compiler and the CPU, then loaded with ctypes. Anything that goes wrong (no
compiler, a read-only cache, an odd platform) leaves the optimizers on their eager path,
which is exact too, only slower. ``HF_MEMOPT_KERNELS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("memopt_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]

# Column layout shared with memopt_cpu.c.
PTR_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sum", "slot")
INT_COLUMNS = ("mode", "slot_bf16", "amsgrad", "maximize", "decoupled")
FLOAT_COLUMNS = ("coef_g", "coef_s", "lr", "weight_decay", "beta1", "beta2", "eps", "step_size", "bc2_sqrt")
# ... and with memopt_adam_fused (the whole step, decisions included)
FUSED_PTR_COLUMNS = (
    *("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sum", "step"),
    *("priorities", "stored_at", "count", "clock"),
)
FUSED_INT_COLUMNS = ("topc", "slots", "group", "aggregation", "slot_bf16", "amsgrad", "maximize", "decoupled")
FUSED_FLOAT_COLUMNS = ("kappa", "decay", "lr", "weight_decay", "beta1", "beta2", "eps")
AGGREGATION_CODES = {"mean": 0, "sum": 1, "mid": 2}


def cache_dir() -> Path:
    root = os.environ.get("HF_MEMOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_memopt"
    )
    return Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is disabled or cannot be built."""
    if os.environ.get("HF_MEMOPT_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return None
    cc = _compiler()
    if cc is None:
        logger.info("hf_memopt: no C compiler found; using the eager path")
        return None
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS, _cpu_fingerprint()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"memopt_cpu-{tag}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                subprocess.run([cc, *_FLAGS, str(_SRC), "-o", str(tmp_out), "-lm"], check=True, capture_output=True)
                os.replace(tmp_out, out)  # atomic: concurrent processes never load a half-written file
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        logger.warning("hf_memopt: could not build the CPU kernel (%s %s); using the eager path", err, detail[-500:])
        return None
    fn = lib.memopt_adam_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    fn = lib.memopt_adam_fused
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int]
    fn = lib.memopt_sq_norms
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    return lib


def adam_step(ptrs: np.ndarray, ints: np.ndarray, floats: np.ndarray, numels: np.ndarray, n_threads: int) -> None:
    """Run one fused memory + Adam(W) step over ``len(numels)`` units (see memopt_cpu.c for columns)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the hf_memopt CPU kernel is not available")
    ptrs = np.ascontiguousarray(ptrs, dtype=np.int64)
    ints = np.ascontiguousarray(ints, dtype=np.int64)
    floats = np.ascontiguousarray(floats, dtype=np.float64)
    numels = np.ascontiguousarray(numels, dtype=np.int64)
    rc = lib.memopt_adam_step(
        len(numels), ptrs.ctypes.data, ints.ctypes.data, floats.ctypes.data, numels.ctypes.data, int(n_threads)
    )
    if rc != 0:
        raise MemoryError("hf_memopt CPU kernel: out of memory for its work table")


def sq_norms(ptrs: np.ndarray, numels: np.ndarray, n_threads: int) -> np.ndarray:
    """fp64 sums of squares of contiguous fp32 buffers (``numels[u]`` values at address ``ptrs[u]``).

    Accumulated in fp64 in a fixed order: the result does not depend on ``n_threads``.
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the hf_memopt CPU kernel is not available")
    ptrs = np.ascontiguousarray(ptrs, dtype=np.int64)
    numels = np.ascontiguousarray(numels, dtype=np.int64)
    out = np.empty(len(numels), dtype=np.float64)
    rc = lib.memopt_sq_norms(len(numels), ptrs.ctypes.data, numels.ctypes.data, out.ctypes.data, int(n_threads))
    if rc != 0:
        raise MemoryError("hf_memopt CPU kernel: out of memory for its work table")
    return out


def adam_fused(
    q: np.ndarray, ints: np.ndarray, floats: np.ndarray, numels: np.ndarray, slot_ptrs: np.ndarray, n_threads: int
) -> np.ndarray:
    """The whole memory-augmented Adam(W) step of ``len(numels)`` units: norms, decisions, update and
    ledger commit (columns in ``FUSED_*_COLUMNS``). Returns ``[U, 3]``: mode, slot and refresh per unit."""
    lib = load()
    if lib is None:
        raise RuntimeError("the hf_memopt CPU kernel is not available")
    arrays = [
        np.ascontiguousarray(q, dtype=np.int64),
        np.ascontiguousarray(ints, dtype=np.int64),
        np.ascontiguousarray(floats, dtype=np.float64),
        np.ascontiguousarray(numels, dtype=np.int64),
        np.ascontiguousarray(slot_ptrs, dtype=np.int64),
    ]
    out = np.zeros((len(numels), 3), dtype=np.int64)
    rc = lib.memopt_adam_fused(len(numels), *(a.ctypes.data for a in arrays), out.ctypes.data, int(n_threads))
    if rc != 0:
        raise MemoryError("hf_memopt CPU kernel: out of memory for its work tables")
    return out
