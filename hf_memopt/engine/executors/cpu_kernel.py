"""Loader of the single-pass CPU kernel (``memopt_cpu.c``) and its Python signatures.

Built once with the system C compiler into the user cache (about a second), keyed by the
source, the compiler and the CPU, then loaded with ctypes. Anything that goes wrong (no
compiler, a read-only cache, an odd platform) leaves "auto" on the "torch" executor, which is
exact too, only slower. ``HF_MEMOPT_KERNELS=0`` turns the kernel off. Where
``$HF_MEMOPT_REQUIRE_EXECUTORS`` names "cpu" (CI), any of these is a :class:`KernelUnavailableError`
carrying the compiler's messages instead.

``HF_MEMOPT_SANITIZE=address`` (or ``address,undefined``) builds an instrumented copy under another
cache name, for a process that runs with the sanitizer runtime preloaded (``tests/sanitize/run_asan.py``).

The per-unit tables the kernel reads are named in the C source's column lists and restated here
(:data:`COLUMNS`); the library reports its own (``memopt_layout``), and :func:`load` refuses a library
whose layout is not the one this module fills. Python code fills columns by name:
``q[:, COLUMNS.fused_ptrs.GRAD] = ...``. The numeric codes both sides share (modes, aggregations,
momentum kinds, the norm chunk, the refresh interval: :func:`codes`) are checked the same way
(``memopt_codes``).
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

from ..._env import REQUIRE_EXECUTORS_ENV, cache_root, env_flag, required_executors
from .. import rule

logger = logging.getLogger(__name__)

#: Set to 0 to turn the CPU kernel off (the "cpu" executor is then unavailable).
KERNELS_ENV = "HF_MEMOPT_KERNELS"

_SRC = Path(__file__).with_name("memopt_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]

#: Sanitizers to build the kernel with (comma-separated: "address", "undefined"); for tests only.
SANITIZE_ENV = "HF_MEMOPT_SANITIZE"
_SANITIZERS = ("address", "undefined")


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


def codes() -> str:
    """The string ``memopt_codes()`` of a matching library returns: every number Python and C must agree on."""
    values = {
        "MODE_NONE": rule.MODE_NONE,
        "MODE_FILL": rule.MODE_FILL,
        "MODE_EVICT": rule.MODE_EVICT,
        **{f"AGG_{name.upper()}": code for name, code in AGGREGATION_CODES.items()},
        "MOMENTUM_NONE": MOMENTUM_NONE,
        "MOMENTUM_LOOP": MOMENTUM_LOOP,
        "MOMENTUM_READY": MOMENTUM_READY,
        "CHUNK": rule.CHUNK,
        "REFRESH_INTERVAL": rule.REFRESH_INTERVAL,
    }
    return ",".join(f"{k}={v}" for k, v in values.items())


class CountOutOfRangeError(ValueError):
    """``memopt_adam_fused`` found the ``memory_count`` of unit ``self.unit`` outside [0, topc], and wrote nothing."""

    def __init__(self, unit: int) -> None:
        super().__init__(f"unit {unit}: memory_count outside [0, topc]")
        self.unit = unit


class LayoutMismatchError(RuntimeError):
    """The compiled kernel's tables are not laid out as this module fills them."""


class KernelUnavailableError(RuntimeError):
    """The kernel cannot be built or loaded here, and ``$HF_MEMOPT_REQUIRE_EXECUTORS`` requires it."""


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


def sanitizers() -> tuple[str, ...]:
    """The sanitizers ``$HF_MEMOPT_SANITIZE`` asks the kernel to be built with (empty when unset)."""
    names = tuple(n.strip().lower() for n in os.environ.get(SANITIZE_ENV, "").split(",") if n.strip())
    unknown = sorted(set(names) - set(_SANITIZERS))
    if unknown:
        raise ValueError(f"{SANITIZE_ENV} names {unknown}; allowed: 'address', 'undefined' (comma-separated)")
    return names


#: Threads the kernel runs on: a positive integer, or ``auto`` (the default, see :func:`kernel_threads`).
THREADS_ENV = "HF_MEMOPT_CPU_THREADS"
_MAX_THREADS = 64  # the C side's own cap (run_parallel)


def kernel_threads() -> int:
    """How many threads the kernel runs a step on: ``$HF_MEMOPT_CPU_THREADS``, else the default below.

    Default (unset or ``auto``): the larger of torch's intra-op threads and this process's share of
    the cores it may run on (``os.sched_getaffinity``) among the ``$LOCAL_WORLD_SIZE`` ranks of its
    node. ``torchrun`` gives every rank ``OMP_NUM_THREADS=1``, i.e. one torch thread; the optimizer step
    of an offloaded run (ZeRO-Offload, FSDP2 ``CPUOffloadPolicy``) is memory-bound work on this
    rank's own partition, during which the rank runs nothing else, so a fair share of the cores
    overloads nothing and is up to that many times faster. Capped at 64 (the kernel's limit).
    Read at every step (two environment reads and one system call): the value may change between steps.
    """
    raw = os.environ.get(THREADS_ENV, "").strip().lower()
    if raw and raw != "auto":
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer or 'auto'; got {raw!r}")
        return min(value, _MAX_THREADS)
    import torch  # deferred: this module loads without torch (the kernel is plain C)

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, min(_MAX_THREADS, max(torch.get_num_threads(), cores // local_ranks)))


def _sanitizer_flags(names: tuple[str, ...]) -> list[str]:
    if not names:
        return []
    # -O1 -g: reports with line numbers and uninlined frames; halt at the first UB report like ASan does
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=" + ",".join(names)]
    if "undefined" in names:
        flags.append("-fno-sanitize-recover=undefined")
    return flags


def _asan_runtime_missing(names: tuple[str, ...]) -> bool:
    """Whether the library is to be built with ASan, whose runtime this process has not loaded: it must
    come first in the initial library list (LD_PRELOAD), else loading the library ends the process."""
    if "address" not in names:
        return False  # UBSan alone: its runtime loads as an ordinary dependency
    try:
        return "libasan" not in Path("/proc/self/maps").read_text()
    except OSError:
        return False  # not Linux: let the loader answer


@cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library, or None and why not (one attempt per process: a failed build is not retried)."""
    if not env_flag(KERNELS_ENV, default=True):
        return None, f"{KERNELS_ENV}=0 turns it off"
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return None, f"the kernel is built on Linux and macOS only, not {platform.system()}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (tried $CC, cc, gcc, clang)"
    names = sanitizers()
    flags = _FLAGS + _sanitizer_flags(names)
    if _asan_runtime_missing(names):
        return None, (
            f"{SANITIZE_ENV}={','.join(names)} needs the ASan runtime loaded first: "
            f"LD_PRELOAD=$({cc} -print-file-name=libasan.so) (tests/sanitize/run_asan.py sets it)"
        )
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *flags, _cpu_fingerprint()]).encode()).hexdigest()[:16]
    variant = "-" + "-".join(names) if names else ""
    out = cache_dir() / f"memopt_cpu{variant}-{tag}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                subprocess.run([cc, *flags, str(_SRC), "-o", str(tmp_out), "-lm"], check=True, capture_output=True)
                os.replace(tmp_out, out)  # atomic: concurrent processes never load a half-written file
        lib = ctypes.CDLL(str(out))
    except subprocess.CalledProcessError as err:
        stderr = (err.stderr or b"").decode(errors="replace")
        return None, f"{cc} could not build {_SRC.name} (exit {err.returncode}):\n{stderr[-4000:]}"
    except OSError as err:
        return None, f"could not build or load {out}: {err}"
    return lib, None


def unavailable() -> str | None:
    """Why the kernel cannot be used here (None: it can)."""
    return _build()[1]


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is disabled or cannot be built.

    Raises :class:`KernelUnavailableError` instead of returning None where ``$HF_MEMOPT_REQUIRE_EXECUTORS``
    names "cpu", and :class:`LayoutMismatchError` for a library whose tables are not laid out as
    :data:`COLUMNS`.
    """
    lib, why = _build()
    if lib is None:
        if "cpu" in required_executors():
            raise KernelUnavailableError(f"{REQUIRE_EXECUTORS_ENV} requires the 'cpu' executor, but {why}")
        # turned off, or no compiler: an ordinary setup, not a fault to warn about
        quiet = not env_flag(KERNELS_ENV, default=True) or _compiler() is None
        (logger.info if quiet else logger.warning)("hf_memopt: the 'cpu' executor is not available: %s", why)
        return None
    lib.memopt_layout.restype = ctypes.c_char_p
    found = lib.memopt_layout().decode()
    if found != COLUMNS.layout():
        raise LayoutMismatchError(
            f"hf_memopt: {lib._name} has the table layout {found!r}, expected {COLUMNS.layout()!r}"
        )
    lib.memopt_codes.restype = ctypes.c_char_p
    found = lib.memopt_codes().decode()
    if found != codes():
        raise LayoutMismatchError(f"hf_memopt: {lib._name} has the codes {found!r}, expected {codes()!r}")
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
    if rc > 0:
        raise CountOutOfRangeError(rc - 1)
    if rc != 0:
        raise MemoryError("hf_memopt CPU kernel: out of memory for its work tables")
    return out
