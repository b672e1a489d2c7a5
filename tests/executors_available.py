"""Whether the fast executors run here, and what a test that needs one does where it does not.

On a developer's machine a test that needs the C kernel ("cpu") or Triton ("triton") is skipped, with
the reason, where that executor cannot run. Where ``$HF_MEMOPT_REQUIRE_EXECUTORS`` names it (``.ci/run``
sets ``cpu,triton``) the same test fails instead, with the compiler's or the importer's message: a
kernel that stops building cannot turn into a green run with fewer tests.

Mark a test or a ``pytest.param`` row with :func:`needs` (``tests/conftest.py`` acts on the mark), or
call :func:`require_or_skip` in a test or fixture. Never leave a row out of a matrix because an
executor is missing: keep it and mark it.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from hf_memopt._env import REQUIRE_EXECUTORS_ENV, required_executors

EXECUTORS = ("cpu", "triton")


@cache
def why_unavailable(name: str) -> str | None:
    """Why the executor ``name`` cannot run this process's CPU tensors (None: it can)."""
    if name == "cpu":
        from hf_memopt.engine.executors import cpu_kernel

        try:
            cpu_kernel.load()  # a kernel with the wrong table layout is an error here, not a skip
        except cpu_kernel.KernelUnavailableError:
            pass  # required and missing: the reason follows
        return cpu_kernel.unavailable()
    if name == "triton":
        from hf_memopt.engine.executors import triton_runtime

        try:
            why = triton_runtime.triton_unavailable()
        except Exception as err:  # where Triton is required, the runtime raises what its import raised
            return f"{type(err).__name__}: {err}"
        if why is None and triton_runtime.runs_on(torch.device("cpu")):  # the interpreter runs these tests
            import numpy
            import triton

            why = triton_runtime.interpreter_defect(triton.__version__, numpy.__version__)
        return why
    if name == "guard":  # not an executor: the C++ snapshot check (hf_memopt.engine.native_guard)
        from hf_memopt.engine import native_guard

        try:
            native_guard.wait()
        except native_guard.NativeGuardUnavailableError:
            pass  # required and missing: the reason follows
        return native_guard.unavailable() or (None if native_guard.load() is not None else "its build did not finish")
    raise ValueError(f"executor {name!r}: allowed {EXECUTORS} (and 'guard')")


def _interpreter_off() -> bool:
    """Triton imports but runs CUDA tensors only (``TRITON_INTERPRET`` unset on a GPU machine, where
    ``test_triton_cuda.py`` runs the kernels): CPU-tensor tests skip there even where Triton is required."""
    from hf_memopt.engine.executors import triton_runtime

    return not triton_runtime.runs_on(torch.device("cpu"))


def available(name: str) -> bool:
    """Whether the executor ``name`` runs CPU tensors here; never fails a test (worker processes use it)."""
    return why_unavailable(name) is None and not (name == "triton" and _interpreter_off())


def wanted(name: str) -> bool:
    """Whether the rows of ``name`` are to run: it is available, or required (then they fail loudly)."""
    return available(name) or name in required_executors()


def require_or_skip(name: str) -> None:
    """Return where the executor ``name`` runs here; else fail the test where ``$HF_MEMOPT_REQUIRE_EXECUTORS``
    names it, skip it where not."""
    why = why_unavailable(name)
    if why is None:
        if name == "triton" and _interpreter_off():
            pytest.skip("Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)")
        return
    if name in required_executors():
        pytest.fail(f"{REQUIRE_EXECUTORS_ENV} requires the {name!r} executor, which is unavailable: {why}", False)
    pytest.skip(f"the {name!r} executor is unavailable: {why}")


def needs(*names: str) -> pytest.MarkDecorator:
    """The mark of a test or row that runs the executors ``names`` (acted on by ``tests/conftest.py``)."""
    for name in names:
        if name not in EXECUTORS:
            raise ValueError(f"executor {name!r}: allowed {EXECUTORS}")
    return pytest.mark.executor(*names)
