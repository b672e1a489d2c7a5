"""Loader of the C++ snapshot check (``native_guard.cpp``), the fast form of :class:`.identity.PythonChecker`.

Reading a tensor's data pointer from Python costs about 85 ns; a step that re-checks the two thousand
tensors of GPT-2-small's state (topc 10) spends 0.2 ms on that alone. The C++ module reads them through
torch's own headers in a few nanoseconds each. It is compiled once per torch build into the user cache
(``$HF_MEMOPT_CACHE/native``), with the system C++ compiler and the headers inside the torch wheel: about
20-40 s. So as not to stall a training step, the first :func:`load` starts the build in a background
thread and returns None; the Python check runs until the module is ready, with the same results
(``tests/test_snapshot.py``). Where ``$HF_MEMOPT_REQUIRE_EXECUTORS`` names "guard" (CI), the build runs
at once and a failure raises. ``HF_MEMOPT_NATIVE_GUARD=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from .._env import REQUIRE_EXECUTORS_ENV, cache_root, env_flag, required_executors

logger = logging.getLogger(__name__)

#: Set to 0 to keep the snapshot check in Python.
SWITCH_ENV = "HF_MEMOPT_NATIVE_GUARD"

_SRC = Path(__file__).with_name("native_guard.cpp")
_NAME = "hf_memopt_native_guard"
_ABI_VERSION = 4
_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w"]

_lock = threading.Lock()
_module: ModuleType | None = None
_why: str | None = None  # why it is unavailable (None: built, being built, or not asked for yet)
_thread: threading.Thread | None = None


class NativeGuardUnavailableError(RuntimeError):
    """The module cannot be built or loaded here, and ``$HF_MEMOPT_REQUIRE_EXECUTORS`` requires it."""


def load() -> ModuleType | None:
    """The compiled module, or None while it is being built or when it cannot be (see the module docstring)."""
    if _module is not None:
        return _module
    with _lock:
        global _thread
        if _thread is None and _why is None:
            if "guard" in required_executors():
                _build()
                if _module is None:
                    raise NativeGuardUnavailableError(
                        f"{REQUIRE_EXECUTORS_ENV} requires the native state check ('guard'), but {_why}"
                    )
            else:
                _thread = threading.Thread(target=_build, name="hf_memopt-native-guard", daemon=True)
                _thread.start()
    return _module


def wait(timeout: float | None = None) -> ModuleType | None:
    """:func:`load`, then wait for a build in progress (benchmarks and tests that want the fast check)."""
    load()
    thread = _thread
    if thread is not None:
        thread.join(timeout)
    return _module


def unavailable() -> str | None:
    """Why the module cannot be used here (None: it can, or its build has not finished)."""
    return _why


def cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> None:
    """Build (or find in the cache) and import the module; sets ``_module`` or ``_why``."""
    global _module, _why
    try:
        _module = _build_and_import()
    except Exception as err:  # noqa: BLE001 - any failure leaves the Python check, said once
        _why = str(err)
        quiet = not env_flag(SWITCH_ENV, default=True)
        (logger.info if quiet else logger.warning)(
            "hf_memopt: the native state check is not available (the Python one runs): %s", _why
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` while the block runs (none where fcntl is missing: concurrent
    builds then each write their own file, and the rename is atomic). Unlocked explicitly: a process forked
    meanwhile (a DataLoader worker) holds a copy of the descriptor, which would keep the lock alive."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build_and_import() -> ModuleType:
    if not env_flag(SWITCH_ENV, default=True):
        raise RuntimeError(f"{SWITCH_ENV}=0 turns it off")
    import torch

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    py_include = sysconfig.get_paths()["include"]
    if not Path(py_include, "Python.h").exists():
        raise RuntimeError(f"Python's headers are not installed ({py_include}/Python.h is missing)")
    torch_dir = Path(torch.__file__).parent
    includes = [py_include, str(torch_dir / "include"), str(torch_dir / "include/torch/csrc/api/include")]
    lib_dir = str(torch_dir / "lib")
    flags = [
        *_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{i}" for i in includes),
    ]
    libs = [f"-L{lib_dir}", "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    src = _SRC.read_bytes()
    fingerprint = " ".join([cxx, *flags, *libs, torch.__version__, str(torch_dir), sys.version])
    tag = hashlib.sha256(src + fingerprint.encode()).hexdigest()[:16]
    out = cache_dir() / f"{_NAME}-{tag}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # one build per machine: the ranks of a job started together wait for the first one's (each is
        # 20-40 s of a core and a few hundred MB) instead of all compiling the same file
        with _locked(out.with_suffix(".lock")):
            if not out.exists():
                with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                    tmp_out = Path(tmp) / out.name
                    cmd = [cxx, *flags, str(_SRC), "-o", str(tmp_out), *libs]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        raise RuntimeError(
                            f"{cxx} could not build {_SRC.name} (exit {done.returncode}):\n{done.stderr[-4000:]}"
                        )
                    os.replace(tmp_out, out)  # atomic: a process never loads a half-written file
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(out))
    spec = importlib.util.spec_from_file_location(_NAME, str(out), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if module.version() != _ABI_VERSION:
        raise RuntimeError(f"{out} has ABI version {module.version()}, expected {_ABI_VERSION}")
    module.set_plain_types((torch.Tensor, torch.nn.Parameter))
    return module


__all__ = ["SWITCH_ENV", "NativeGuardUnavailableError", "cache_dir", "load", "unavailable", "wait"]
