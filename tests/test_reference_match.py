"""The whole-step CPU kernel: taken by default, and exact whatever the thread count.

The rule itself is held to the slow SPEC reference on every executor by ``test_rule_matrix.py``.
"""

import pytest
import torch
from executors_available import require_or_skip
from reference import ReferenceOptimizer
from streams import SHAPES, clone_params, gradient_stream, make_params, set_grads

import hf_memopt

STEPS = 14


def run_pair(
    name, base_kwargs, memory_kwargs, impl_kwargs=None, steps=STEPS, dtype=torch.float32, setup=None, shapes=SHAPES
):
    params = make_params(dtype, shapes=shapes)
    ref_params = clone_params(params)
    opt = getattr(hf_memopt, name)(params, **base_kwargs, **memory_kwargs, **(impl_kwargs or {}))
    if setup is not None:
        setup(opt)
    ref = ReferenceOptimizer(name, ref_params, **memory_kwargs, **base_kwargs)
    peak = [0.0] * len(params)
    for grads in gradient_stream(steps, dtype, shapes=shapes):
        peak = [max(m, g.abs().max().item()) if g is not None else m for m, g in zip(peak, grads)]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
    opt.peak = peak  # largest gradient entry each tensor saw: the scale of S's rounding
    return opt, ref, params, ref_params


def assert_memory_equal(opt, ref, params, topc, priority_rel=1e-6):
    for i, p in enumerate(params):
        stored = ref.stored(i)
        state = opt.state[p]
        assert int(state["memory_count"]) == len(stored)
        for j, (value, priority) in enumerate(stored):
            torch.testing.assert_close(state[f"memory_{j}"], value, rtol=0, atol=0)
            assert state[f"priority_{j}"].item() == pytest.approx(priority, rel=priority_rel)
        if stored:
            total = torch.stack([v.double() for v, _ in stored]).sum(0)
            # S is a running fp32 sum (S += stored - evicted): its error scales with the largest
            # gradient that passed through it, not with what is stored now.
            atol = 8 * torch.finfo(torch.float32).eps * max(opt.peak[i], 1.0)
            torch.testing.assert_close(state["memory_sum"].double(), total, rtol=1e-5, atol=atol)


def test_kernel_path_is_taken_by_default(monkeypatch):
    import hf_memopt.engine.executors.cpu_kernel as kernels

    require_or_skip("cpu")
    calls = []
    real = kernels.adam_fused
    monkeypatch.setattr(kernels, "adam_fused", lambda *a: calls.append(len(a[3])) or real(*a))
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [len(params)]  # one kernel call per step, covering every tensor


def test_kernel_is_exact_at_every_thread_count():
    """Tensors of many kernel chunks, split across 1, 2 and 3 threads: the same priorities, memory and
    parameters bit for bit (decisions must not depend on the machine), and all equal to the reference."""
    require_or_skip("cpu")
    shapes = [(1_000_003,), (611, 491), (17,), (300_001,)]  # not multiples of the 16384-element chunk
    memory = dict(topc=2, decay=0.9, kappa=1.0, aggregation="mean", key="group", buffer_dtype=None)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(run_pair("MemoryAugmentedAdamW", dict(lr=1e-2), memory, steps=6, shapes=shapes))
    finally:
        torch.set_num_threads(previous)
    opt1, ref, params1, ref_params = runs[0]
    for opt, _, params, _ in runs[1:]:
        for p, q in zip(params, params1):
            assert torch.equal(p, q)
            for key, value in opt.state[p].items():
                torch.testing.assert_close(value, opt1.state[q][key], rtol=0, atol=0)
    for p, q in zip(params1, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the reference's fp32 norms of a million elements carry ~1e-6 relative error; the kernel sums in fp64
    assert_memory_equal(opt1, ref, params1, memory["topc"], priority_rel=3e-5)
    assert sum(int(opt1.state[p]["memory_count"]) for p in params1) == len(shapes) * memory["topc"]
