"""Which Triton the "triton" executor runs with: the supported range, what happens outside it, and the
interpreter defects of old Triton releases (SPEC section 8)."""

from __future__ import annotations

import pytest
import torch

import hf_memopt
from hf_memopt._env import REQUIRE_EXECUTORS_ENV
from hf_memopt.engine.executors import triton_runtime


@pytest.mark.parametrize(
    "version,inside",
    [("3.5.1", False), ("3.6.0", True), ("3.6.0+git9f2a", True), ("3.9.1", True), ("3.10.0", False), ("4.0", False)],
)
def test_the_supported_range_is_3_6_to_3_9(version, inside):
    why = triton_runtime.unsupported_version(version)
    assert (why is None) == inside
    if not inside:
        assert version in why and ">= 3.6.0, < 3.10.0" in why


@pytest.fixture
def old_triton(monkeypatch):
    """A Triton outside the range, loaded afresh (the module's state is restored afterwards)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.5.0")
    for name, value in (("_kernels", None), ("_kernels_error", None), ("_interpreted", False)):
        monkeypatch.setattr(triton_runtime, name, value)
    monkeypatch.delenv(REQUIRE_EXECUTORS_ENV, raising=False)


def test_outside_the_range_the_executor_says_why_it_cannot_run(old_triton):
    assert triton_runtime.kernels() is None
    assert "Triton 3.5.0 is outside the supported range" in triton_runtime.triton_unavailable()
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedAdamW([p], executor="triton")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Triton 3.5.0 is outside the supported range"):
        opt.step()


def test_outside_the_range_auto_runs_cuda_parameters_on_the_torch_executor_said_once(old_triton, monkeypatch, caplog):
    """ "auto" on CUDA parameters (stood in for: this machine has no GPU) falls back to "torch", logged once."""
    from hf_memopt.engine import executors

    monkeypatch.setattr(executors, "_on_cuda", lambda work: True)
    monkeypatch.setattr(executors, "_logged_no_triton", False)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedAdamW([p])
    with caplog.at_level("INFO", logger="hf_memopt"):
        for _ in range(3):
            p.grad = torch.ones(3)
            opt.step()
    assert opt.executor_for(0) == "torch"
    said = [r.getMessage() for r in caplog.records if "Triton 3.5.0 is outside the supported range" in r.getMessage()]
    assert len(said) == 1 and "'torch' executor" in said[0]


def test_outside_the_range_a_required_triton_is_an_error(old_triton, monkeypatch):
    monkeypatch.setenv(REQUIRE_EXECUTORS_ENV, "cpu,triton")
    with pytest.raises(triton_runtime.TritonUnavailableError, match=r"requires the 'triton' executor, but Triton 3\.5"):
        triton_runtime.kernels()
    with pytest.raises(triton_runtime.TritonUnavailableError):
        triton_runtime.triton_unavailable()


def test_the_interpreter_defects_of_triton_3_6():
    assert "numpy >= 2.4" in triton_runtime.interpreter_defect("3.6.0", "2.4.0")
    assert triton_runtime.interpreter_defect("3.6.0", "2.3.5") is None
    assert triton_runtime.interpreter_defect("3.9.0", "2.5.2") is None
    assert triton_runtime.fma_rounded_twice("3.6.0") and not triton_runtime.fma_rounded_twice("3.9.0")
