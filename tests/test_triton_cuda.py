"""The "triton" executor on a CUDA GPU (skipped elsewhere): the same decisions as the "torch" executor on
CUDA tensors, no synchronisation under ``torch.cuda.set_sync_debug_mode("error")``, and CUDA-graph capture
(``capturable=True``) replaying like eager steps. ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import pytest
import torch
from streams import gradient_stream, lockstep, make_params, set_grads
from test_triton_executor import OPTIMIZERS

import hf_memopt
from hf_memopt.engine.executors import triton as triton_executor

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_executor.runs_on(DEVICE)), reason="needs a CUDA GPU and Triton"
)


def _cuda(params):
    return [p.detach().to(DEVICE).requires_grad_() for p in params]


def _stream(steps, skip_every=3, dtype=torch.float32):
    return [
        [None if g is None else g.to(DEVICE) for g in grads]
        for grads in gradient_stream(steps, dtype, skip_every=skip_every)
    ]


@pytest.mark.parametrize("buffer_dtype", [None, "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_it_decides_like_the_torch_executor(name, buffer_dtype):
    """On the same CUDA gradients: the same slots, counts and S; priorities to 1e-6 (torch's foreach norms
    reduce in their own order); parameters to the last bits."""
    kw = dict(OPTIMIZERS[name], topc=3, decay=0.8, buffer_dtype=buffer_dtype, key="group")
    kw.pop("fused", None)
    params, twin = _cuda(make_params()), _cuda(make_params())
    opt = getattr(hf_memopt, name)(params, executor="triton", **kw)
    ref = getattr(hf_memopt, name)(twin, executor="torch", **kw)
    for _ in lockstep(_stream(20), (opt, params), (ref, twin)):
        for p, q in zip(params, twin):
            a, b = opt.state[p], ref.state[q]
            assert int(a["memory_count"]) == int(b["memory_count"])
            for i in range(int(a["memory_count"])):
                assert torch.equal(a[f"memory_{i}"], b[f"memory_{i}"])
                torch.testing.assert_close(a[f"priority_{i}"], b[f"priority_{i}"], rtol=1e-6, atol=0)
            torch.testing.assert_close(a["memory_sum"], b["memory_sum"], rtol=1e-6, atol=1e-6)
    assert opt.executor_for(0) == "triton"
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_sync_debug_mode_sees_no_synchronisation(name):
    params = [p.detach().to(DEVICE).requires_grad_() for p in make_params()]
    opt = getattr(hf_memopt, name)(params, topc=2, buffer_dtype="bf16", **OPTIMIZERS[name])
    stream = [[None if g is None else g.to(DEVICE) for g in grads] for grads in gradient_stream(6)]
    for grads in stream[:2]:
        set_grads(params, grads)
        opt.step()
    assert opt.executor_for(0) == "triton"  # "auto" picks it on CUDA
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grads in stream[2:]:
            for p, g in zip(params, grads):
                if g is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedSGD", "CriticalMomentaAdamW"])
def test_cuda_graph_capture_replays_like_eager_steps(name):
    kwargs = dict(OPTIMIZERS[name], topc=3, decay=0.8, buffer_dtype="bf16")
    kwargs.pop("fused", None)
    if name != "MemoryAugmentedSGD":  # SGD has no capturable flag: torch's SGD captures as it is
        kwargs["capturable"] = True
    stream = [[g.to(DEVICE) for g in grads] for grads in gradient_stream(12, skip_every=0)]
    eager = [p.detach().to(DEVICE).requires_grad_() for p in make_params()]
    opt_e = getattr(hf_memopt, name)(eager, **kwargs)
    for grads in stream:
        set_grads(eager, grads)
        opt_e.step()

    params = [p.detach().to(DEVICE).requires_grad_() for p in make_params()]
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradients: the graph reads these tensors
    opt = getattr(hf_memopt, name)(params, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for grads in stream[:3]:  # warm-up: state, tables and the kernels' compilation
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for grads in stream[3:]:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("memory_0", "memory_1", "memory_2", "memory_sum", "memory_count", "priority_0"):
            torch.testing.assert_close(opt.state[p][key], opt_e.state[q][key], rtol=0, atol=0)
