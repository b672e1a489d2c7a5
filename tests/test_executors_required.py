"""CI cannot lose an executor: where ``$HF_MEMOPT_REQUIRE_EXECUTORS`` names "cpu" or "triton", a C kernel
that does not build, or a Triton that does not import, is an error and fails the tests of that executor;
elsewhere it leaves "auto" on "torch" and those tests skip, with the reason.

The C source is broken through the compiler (a wrapper that puts a syntax error in front of
``memopt_cpu.c``, in a fresh kernel cache), Triton through a package of that name that raises on import,
first on the path: nothing in the working tree changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import executors_available
import pytest
import torch
from executors_available import needs, require_or_skip

import hf_memopt
from hf_memopt._env import REQUIRE_EXECUTORS_ENV
from hf_memopt.engine.executors import cpu_kernel

ROOT = Path(__file__).resolve().parents[1]
BROKEN_C = "this_is_not_c broken on purpose;\n"
BROKEN_TRITON = "triton broken on purpose by test_executors_required.py"


def broken_compiler(tmp_path: Path) -> str:
    """A compiler that compiles memopt_cpu.c with a syntax error in front of it (as if the source had one)."""
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc is not None, "the 'cpu' executor runs here, so a C compiler exists"
    (tmp_path / "broken.h").write_text(BROKEN_C)
    wrapper = tmp_path / "broken-cc"
    wrapper.write_text(f'#!/bin/sh\nexec "{cc}" -include "{tmp_path / "broken.h"}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def broken_triton(tmp_path: Path) -> Path:
    """A folder to put first on ``PYTHONPATH``: its ``triton`` raises on import."""
    package = tmp_path / "fake_site" / "triton"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({BROKEN_TRITON!r})\n")
    return package.parent


def _outcome(name: str) -> tuple[str, str]:
    """What ``require_or_skip(name)`` does: ("returned", ""), ("skip", why) or ("fail", why)."""
    try:
        require_or_skip(name)
    except pytest.skip.Exception as err:
        return "skip", str(err)
    except pytest.fail.Exception as err:
        return "fail", str(err)
    return "returned", ""


def test_require_or_skip_skips_a_missing_executor_unless_it_is_required(monkeypatch):
    monkeypatch.setattr(executors_available, "why_unavailable", lambda name: "no compiler (test)")
    monkeypatch.delenv(REQUIRE_EXECUTORS_ENV, raising=False)
    assert _outcome("cpu") == ("skip", "the 'cpu' executor is unavailable: no compiler (test)")
    monkeypatch.setenv(REQUIRE_EXECUTORS_ENV, "triton,cpu")
    assert _outcome("cpu") == (
        "fail",
        f"{REQUIRE_EXECUTORS_ENV} requires the 'cpu' executor, which is unavailable: no compiler (test)",
    )
    monkeypatch.setattr(executors_available, "why_unavailable", lambda name: None)
    assert _outcome("cpu") == ("returned", "")


@needs("cpu")
def test_a_kernel_that_does_not_compile_is_an_error_where_required(tmp_path, monkeypatch):
    """Required: the compiler's message, from load() and from a step of "auto". Not required: None, a
    warning, and "auto" runs on "torch"."""
    monkeypatch.setenv("CC", broken_compiler(tmp_path))
    monkeypatch.setenv("HF_MEMOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(REQUIRE_EXECUTORS_ENV, "cpu")
    cpu_kernel._build.cache_clear()
    cpu_kernel.load.cache_clear()
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    try:
        message = r"requires the 'cpu' executor, but .* could not build memopt_cpu\.c(?s:.*)this_is_not_c"
        with pytest.raises(cpu_kernel.KernelUnavailableError, match=message):
            cpu_kernel.load()
        with pytest.raises(cpu_kernel.KernelUnavailableError, match=message):
            hf_memopt.MemoryAugmentedAdamW([p], executor="auto").step()
        assert torch.equal(p.detach(), torch.zeros(4))

        monkeypatch.delenv(REQUIRE_EXECUTORS_ENV)
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is None
        opt = hf_memopt.MemoryAugmentedAdamW([p], executor="auto")
        opt.step()
        assert opt.executor_for(0) == "torch"
    finally:
        monkeypatch.undo()
        cpu_kernel._build.cache_clear()
        cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None


@needs("cpu", "triton")
def test_a_required_executor_that_is_missing_fails_its_rows_instead_of_skipping(tmp_path):
    """The test suite itself, with the kernel and Triton broken: the rule matrix's "cpu" and "triton" rows
    and a test that calls require_or_skip fail (none skips, none is left out), each with the cause."""
    env = dict(os.environ)
    env.update(
        CC=broken_compiler(tmp_path),
        HF_MEMOPT_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(broken_triton(tmp_path)), env.get("PYTHONPATH", "")]),
        **{REQUIRE_EXECUTORS_ENV: "cpu,triton"},
    )
    selection = [
        "tests/test_rule_matrix.py::test_ties_go_to_the_lowest_slot[AdamW-cpu]",
        "tests/test_rule_matrix.py::test_ties_go_to_the_lowest_slot[AdamW-triton]",
        "tests/test_checkpoint.py::test_a_checkpoint_continues_on_another_executor[cpu-triton]",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *selection],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1]
    assert proc.returncode == 1, out
    # a mark's failure is reported as an error in setup, a require_or_skip() in the body as a failure
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}
    assert counts.get("failed", 0) + counts.get("error", 0) == 3 and counts.keys() <= {"failed", "error"}, summary
    assert out.count(f"{REQUIRE_EXECUTORS_ENV} requires the 'cpu' executor") >= 1, out
    assert out.count(f"{REQUIRE_EXECUTORS_ENV} requires the 'triton' executor") >= 1, out
    assert "this_is_not_c" in out and BROKEN_TRITON in out, out


@needs("cpu")
def test_a_sanitized_kernel_is_not_loaded_into_a_process_without_the_asan_runtime(monkeypatch):
    """ASan ends a process that loads an instrumented library without its runtime preloaded; the
    loader says what to preload instead (and raises where the kernel is required)."""
    if cpu_kernel.sanitizers():
        pytest.skip("this process runs the sanitized kernel (tests/sanitize/run_asan.py)")
    monkeypatch.setenv(cpu_kernel.SANITIZE_ENV, "address,undefined")
    monkeypatch.delenv(REQUIRE_EXECUTORS_ENV, raising=False)
    cpu_kernel._build.cache_clear()
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None
        assert "LD_PRELOAD=" in cpu_kernel.unavailable() and "libasan.so" in cpu_kernel.unavailable()
        monkeypatch.setenv(REQUIRE_EXECUTORS_ENV, "cpu")
        cpu_kernel.load.cache_clear()
        with pytest.raises(cpu_kernel.KernelUnavailableError, match="needs the ASan runtime loaded first"):
            cpu_kernel.load()
        monkeypatch.setenv(cpu_kernel.SANITIZE_ENV, "address,thread")
        cpu_kernel._build.cache_clear()
        with pytest.raises(
            ValueError, match="HF_MEMOPT_SANITIZE names \\['thread'\\]; allowed: 'address', 'undefined'"
        ):
            cpu_kernel.load()
    finally:
        monkeypatch.undo()
        cpu_kernel._build.cache_clear()
        cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None


def test_a_native_guard_that_does_not_compile_is_an_error_where_required(tmp_path, monkeypatch):
    """The C++ snapshot check (hf_memopt.engine.native_guard) under ``$HF_MEMOPT_REQUIRE_EXECUTORS`` naming
    "guard" (CI): a compile error is an error carrying the compiler's message. Not required: None, the reason
    kept, and steady steps run on the Python check."""
    from hf_memopt.engine import native_guard

    require_or_skip("guard")  # a C++ compiler and torch's headers are here
    require_or_skip("cpu")  # "auto" runs the group on "cpu", which takes steady steps
    cxx = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++") or shutil.which("clang++")
    (tmp_path / "broken.h").write_text(BROKEN_C)
    wrapper = tmp_path / "broken-cxx"
    wrapper.write_text(f'#!/bin/sh\nexec "{cxx}" -include "{tmp_path / "broken.h"}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("HF_MEMOPT_CACHE", str(tmp_path / "cache"))

    def fresh() -> None:
        for name in ("_module", "_why", "_thread"):
            monkeypatch.setattr(native_guard, name, None)

    monkeypatch.setenv(REQUIRE_EXECUTORS_ENV, "guard")
    fresh()
    message = (
        r"requires the native state check \('guard'\), but .* could not build native_guard\.cpp(?s:.*)this_is_not_c"
    )
    with pytest.raises(native_guard.NativeGuardUnavailableError, match=message):
        native_guard.load()

    monkeypatch.delenv(REQUIRE_EXECUTORS_ENV)
    fresh()
    assert native_guard.wait() is None
    assert "this_is_not_c" in (native_guard.unavailable() or "")
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    twin = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=0.1, topc=2, executor="auto")
    ref = hf_memopt.MemoryAugmentedAdamW(twin, lr=0.1, topc=2, executor="torch")
    for t in range(4):
        for p, q in zip(params, twin):
            p.grad = torch.full((3,), float(t + 1))
            q.grad = torch.full((3,), float(t + 1))
        opt.step()
        ref.step()
    assert opt._engine.cache.get(("snapshot", 0, "auto")) is not None  # steady steps ran, on the Python check
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
