"""Every launch the "triton" executor makes compiles for a GPU (sm_90: H100/H200, sm_80: A100), without a GPU.

Triton's interpreter, which runs the other triton tests here, accepts code the GPU compiler rejects (two
of the four kernels once did not compile at all). :mod:`triton_compile` records the distinct launches of
real interpreter runs (every optimizer, param and buffer dtype, topc 1-20, both keys, a norm reducer,
several param groups, multi-chunk tensors) and compiles each one for a GPU target through ptxas, with the
installed Triton and with the oldest supported one (``$HF_MEMOPT_TRITON_OLDEST``: a ``pip install --target``
folder holding it, which ``.ci/run`` makes). Registers and spills per kernel are printed (``pytest -s``).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton_compile as tc
from executors_available import needs
from test_triton_executor import OPTIMIZERS

import hf_memopt
from hf_memopt._env import REQUIRE_EXECUTORS_ENV, required_executors
from hf_memopt.engine.executors import triton_runtime

pytestmark = needs("triton")

#: a folder holding the oldest supported Triton (``pip install --target DIR triton==3.6.0``)
OLDEST_ENV = "HF_MEMOPT_TRITON_OLDEST"
ARCHS = [90, 80]


@pytest.fixture(scope="module")
def launches():
    return tc.record_launches()


@pytest.fixture(scope="module")
def compiled(launches):
    results = tc.compile_in_subprocess(launches, ARCHS)
    print("\n" + tc.table(results))
    return results


def test_the_recorded_launches_cover_the_matrix(launches):
    """The matrix reaches every specialisation it claims (else a launch could go uncompiled)."""
    by_kernel: dict[str, list[dict]] = {}
    for launch in launches:
        by_kernel.setdefault(launch["kernel"], []).append(launch["kwargs"])
    assert set(by_kernel) == set(tc.KERNELS)
    decide = by_kernel["decide"]
    assert {kw["BLOCK_C"] for kw in decide} == {1, 2, 4, 8, 16, 32}  # topc 1 .. 20
    assert {kw["BLOCK_U"] for kw in decide} >= {1, 2, 128}
    assert {(kw["KEY_GROUP"], kw["CHECK_CAST"]) for kw in decide} == {(a, b) for a in (0, 1) for b in (0, 1)}
    apply = by_kernel["apply"]
    dtypes = {"fp32", "bf16", "fp16"}
    assert {(kw["X_DT"]["dtype"], kw["SLOT_DT"]["dtype"]) for kw in apply} == {(x, s) for x in dtypes for s in dtypes}
    flags = {(kw["DECOUPLED"], kw["AMSGRAD"], kw["MAXIMIZE"]) for kw in apply if kw["ADAM"]}
    assert {f[0] for f in flags} == {True, False} and {f[1] for f in flags} == {True, False}
    assert {f[2] for f in flags} == {True, False}
    assert {kw["SAME"] for kw in by_kernel["norm_partials"]} == {True, False}  # Critical Momenta stores m


def test_every_launch_compiles_for_the_gpu_without_spilling(compiled, launches):
    assert len(compiled) == len(launches) * len(ARCHS)
    assert tc.problems(compiled) == []


def test_aligned_tensors_get_16_byte_vector_loads_and_stores(compiled):
    """norm_partials and apply read (and apply writes) fp32 and bf16 values 16 bytes at a time where every
    address of a chunk is aligned: ``ld.global.v4.b32`` in the PTX (a bf16 vector is four b32 pairs)."""
    for r in compiled:
        if r["kernel"] in ("norm_partials", "apply") and r["constexprs"]["X_DT"]["dtype"] in ("fp32", "bf16"):
            assert "ld.global.v4.b32" in r["vector_ops"], r
            if r["kernel"] == "apply":
                assert "st.global.v4.b32" in r["vector_ops"], r


def test_the_oldest_supported_triton_compiles_them_too(launches):
    folder = os.environ.get(OLDEST_ENV)
    if not folder:
        message = f"set {OLDEST_ENV} to a folder holding triton=={'.'.join(map(str, triton_runtime.SUPPORTED[0]))}"
        if "triton" in required_executors():
            pytest.fail(f"{REQUIRE_EXECUTORS_ENV} requires the 'triton' executor: {message} (.ci/run does)", False)
        pytest.skip(message)
    results = tc.compile_in_subprocess(launches, ARCHS, triton_path=folder)
    print("\n" + tc.table(results))
    assert {triton_runtime.version_tuple(r["triton"]) for r in results} == {triton_runtime.SUPPORTED[0]}
    assert tc.problems(results) == []


# -- the aligned path and its fallback, under the interpreter ---------------------------------------------

#: (storage offset, numel) of each parameter in one flat buffer: the 16-byte aligned path (offset 0 and
#: a multiple of 8 elements; a tensor of three chunks), an address one element off, an aligned start
#: whose end is not a multiple of 8
_VIEWS = [(0, 64), (64, 40000), (40065, 40), (40112, 13)]


def _views(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[o : o + n] for o, n in _VIEWS]


@pytest.mark.parametrize(
    "name,buffer_dtype",
    [("MemoryAugmentedAdamW", None), ("MemoryAugmentedSGD", "bf16"), ("CriticalMomentaAdamW", None)],
)
def test_unaligned_tensors_take_the_scalar_path_to_the_same_results(name, buffer_dtype):
    """Views at odd offsets (a flat buffer's parameters, as in ZeRO's partitions) and ends that are not a
    multiple of 8 elements run the kernels' scalar fallback; with the aligned tensors beside them (the
    vector path) every step equals the "torch" executor's."""
    total = _VIEWS[-1][0] + _VIEWS[-1][1]
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(total, generator=gen)
    runs = {}
    for executor in ("torch", "triton"):
        flat = start.clone()
        params = [torch.nn.Parameter(v) for v in _views(flat)]
        assert [p.data_ptr() % 16 == 0 for p in params] == [True, True, False, True]
        kw = dict(OPTIMIZERS[name], topc=2, decay=0.8, buffer_dtype=buffer_dtype, key="tensor")
        kw.pop("fused", None)
        opt = getattr(hf_memopt, name)(params, executor=executor, **kw)
        grad_gen = torch.Generator().manual_seed(1)
        for t in range(6):
            grads = _views(torch.randn(total, generator=grad_gen) * (t + 1))
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        assert opt.executor_for(0) == executor
        runs[executor] = (params, opt)
    (p_torch, o_torch), (p_triton, o_triton) = runs["torch"], runs["triton"]
    for p, q in zip(p_torch, p_triton):
        a, b = o_torch.state[p], o_triton.state[q]
        for key in ("memory_0", "memory_1", "memory_sum", "memory_count", "priority_0", "priority_1", "stored_at_0"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
