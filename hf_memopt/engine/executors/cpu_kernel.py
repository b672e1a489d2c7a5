"""Loader of the single-pass CPU kernel (``memopt_cpu.c``) and its Python signatures.

Built once with the system C compiler into the user cache (about a second), keyed by the
source, the compiler and the CPU, then loaded with ctypes. Anything that goes wrong (no
compiler, a read-only cache, an odd platform) leaves "auto" on the "torch" executor, which is
exact too, only slower. ``HF_MEMOPT_KERNELS=0`` turns the kernel off.

The per-unit tables the kernel reads are named once, in the C source's column lists; the
library reports them (``memopt_layout``) and :func:`load` refuses a library whose layout is not
the one this module fills (:data:`COLUMNS`). Python code fills columns by name:
``q[:, COLUMNS.fused_ptrs.GRAD] = ...``.
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

from ..._env import cache_root, env_flag

logger = logging.getLogger(__name__)

#: Set to 0 to turn the CPU kernel off (the "cpu" executor is then unavailable).
KERNELS_ENV = "HF_MEMOPT_KERNELS"

_SRC = Path(__file__).with_name("memopt_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]


class Table:
    """The columns of one kernel table: ``Table("A", "B").B == 1``, ``len(table) == 2``."""

    def __init__(self, *names: str) -> None:
        self.names = names
        for i, name in enumerate(names):
            setattr(self, name, i)

    def __len__(self) -> int:
        return len(self.names)


class _Columns:
    """The tables of ``memopt_adam_step`` (``step_*``) and ``memopt_adam_fused`` (``fused_*``)."""

    step_ptrs = Table("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_SQ", "MAX_EXP_AVG_SQ", "SUM", "SLOT")
    step_ints = Table("MODE", "SLOT_BF16", "AMSGRAD", "MAXIMIZE", "DECOUPLED", "MOMENTUM")
    step_floats = Table("COEF_G", "COEF_S", "LR", "WD", "BETA1", "BETA2", "EPS", "STEP_SIZE", "BC2_SQRT")
    fused_ptrs = Table(
        *("PARAM", "GRAD", "EXP_AVG", "EXP_AVG_SQ", "MAX_EXP_AVG_SQ", "SUM", "STEP"),
        *("PRI", "STORED_AT", "COUNT", "CLOCK", "M_BOUND"),
    )
    fused_ints = Table("TOPC", "SLOTS", "GROUP", "AGG", "SLOT_BF16", "AMSGRAD", "MAXIMIZE", "DECOUPLED", "MOMENTUM")
    fused_floats = Table("KAPPA", "DECAY", "LR", "WD", "BETA1", "BETA2", "EPS")

    def layout(self) -> str:
        """The string ``memopt_layout()`` of a matching library returns."""
        tables = ("step_ptrs", "step_ints", "step_floats", "fused_ptrs", "fused_ints", "fused_floats")
        return ";".join(f"{t}:" + "".join(f"{n}," for n in getattr(self, t).names) for t in tables)


COLUMNS = _Columns()
AGGREGATION_CODES = {"mean": 0, "sum": 1, "mid": 2}
#: ``step_ints.MOMENTUM``: Adam(W) on the aggregate of g; Critical Momenta with m advanced in the loop;
#: Critical Momenta with step, decay and m advanced by the caller (host decisions)
MOMENTUM_NONE, MOMENTUM_LOOP, MOMENTUM_READY = 0, 1, 2


class LayoutMismatchError(RuntimeError):
    """The compiled kernel's tables are not laid out as this module fills them."""


def cache_dir() -> Path:
    return cache_root() / "kernels"


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
    if not env_flag(KERNELS_ENV, default=True):
        return None
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return None
    cc = _compiler()
    if cc is None:
        logger.info("hf_memopt: no C compiler found; the 'cpu' executor is not available")
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
        logger.warning(
            "hf_memopt: could not build the CPU kernel (%s %s); the 'cpu' executor is not available", err, detail[-500:]
        )
        return None
    lib.memopt_layout.restype = ctypes.c_char_p
    found = lib.memopt_layout().decode()
    if found != COLUMNS.layout():
        raise LayoutMismatchError(f"hf_memopt: {out} has the table layout {found!r}, expected {COLUMNS.layout()!r}")
    fn = lib.memopt_adam_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    fn = lib.memopt_adam_fused
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int]
    fn = lib.memopt_sq_norms
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    return lib


def adam_step(ptrs: np.ndarray, ints: np.ndarray, floats: np.ndarray, numels: np.ndarray, n_threads: int) -> None:
    """Run one fused memory + Adam(W) step over ``len(numels)`` units (columns in ``COLUMNS.step_*``)."""
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


def sq_norms(
    ptrs: np.ndarray, numels: np.ndarray, n_threads: int, with_max: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """fp64 sums of squares of contiguous fp32 buffers (``numels[u]`` values at address ``ptrs[u]``) and,
    ``with_max``, their largest absolute values (fp32; else None).

    Accumulated in fp64 in a fixed order (16K-element chunks, in chunk order): the result does not
    depend on ``n_threads``.
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the hf_memopt CPU kernel is not available")
    ptrs = np.ascontiguousarray(ptrs, dtype=np.int64)
    numels = np.ascontiguousarray(numels, dtype=np.int64)
    out = np.empty(len(numels), dtype=np.float64)
    out_max = np.empty(len(numels), dtype=np.float32) if with_max else None
    rc = lib.memopt_sq_norms(
        len(numels),
        ptrs.ctypes.data,
        numels.ctypes.data,
        out.ctypes.data,
        out_max.ctypes.data if out_max is not None else None,
        int(n_threads),
    )
    if rc != 0:
        raise MemoryError("hf_memopt CPU kernel: out of memory for its work table")
    return out, out_max


def adam_fused(
    q: np.ndarray, ints: np.ndarray, floats: np.ndarray, numels: np.ndarray, slot_ptrs: np.ndarray, n_threads: int
) -> np.ndarray:
    """The whole memory-augmented Adam(W) step of ``len(numels)`` units: norms, decisions, update and
    ledger commit (columns in ``COLUMNS.fused_*``). Returns ``[U, 3]``: mode, slot and refresh per unit."""
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
