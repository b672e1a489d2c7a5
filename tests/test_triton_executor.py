"""The "triton" executor beyond the rule matrix: no host synchronisation in ``step()``, device counters,
switching executors mid-run, flat-partition segments, its errors, and (on a GPU) CUDA's sync debug
mode and CUDA-graph capture. Without a GPU the kernels run under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``); the rule itself is held to the SPEC reference in ``test_rule_matrix.py`` and
``test_critical_momenta.py``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from executors_available import needs, wanted
from reference import ReferenceOptimizer
from streams import clone_params, gradient_stream, lockstep, make_params, set_grads, step_all
from test_rule_matrix import assert_same_memory, assert_same_params

import hf_memopt
from hf_memopt.engine.executors import triton as triton_executor
from hf_memopt.engine.executors import triton_runtime

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda")
#: CPU tensors: the kernels under Triton's interpreter (a GPU machine runs these with TRITON_INTERPRET=1)
pytestmark = needs("triton")


OPTIMIZERS = {
    "MemoryAugmentedAdamW": dict(lr=1e-2, weight_decay=0.1),
    "MemoryAugmentedAdam": dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
    "MemoryAugmentedSGD": dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01),
    "MemoryAugmentedRMSprop": dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.01),
    # fused=True: torch keeps the step counters where the parameters are (as capturable=True does), and the
    # bias corrections are computed there; with CPU counters they are read on the host in one call, which
    # on a GPU reads host memory (no wait) but under the interpreter cannot be told apart from a device read
    "CriticalMomentaAdamW": dict(lr=1e-2, weight_decay=0.1, fused=True),
}

#: Tensor methods that read a value on the host: on a GPU each one waits for the device.
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")
_INTERPRETER = os.sep + "triton" + os.sep  # Triton's own package: its interpreter copies kernel arguments


class HostReads:
    """Records every host read of a tensor made while it is active (the caller's file and the method).

    Left out: reads made by Triton's interpreter itself (on a GPU there is none: the kernels run there),
    and reads of ``allowed`` tensors: torch's per-parameter ``step`` counters, which torch keeps on the
    CPU (unless capturable/fused) precisely so that reading them never waits for the device.
    """

    def __init__(self, allowed=lambda: ()):
        #: the allowed tensors, asked at each read: the optimizer may give its counters new objects (the
        #: "triton" executor pools them into one tensor, hf_memopt.engine.state.pool_steps)
        self.allowed = allowed
        self.calls: list[tuple[str, str]] = []
        self.read_ids: set[int] = set()
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def read(t, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if _INTERPRETER not in caller and all(t is not a for a in self.allowed()):
                    self.calls.append((caller, _name))
                    self.read_ids.add(id(t))
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _steps(opt):
    """torch's step counters of ``opt`` and, where they are views of one pooled tensor, that tensor."""
    steps = [s["step"] for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor)]
    return steps + [s._base for s in steps if s._base is not None]


def _run_reads(name, executor, reducer=False):
    params = make_params()
    opt = getattr(hf_memopt, name)(params, topc=2, buffer_dtype="bf16", executor=executor, **OPTIMIZERS[name])
    if reducer:
        opt.norm_reducer = lambda units, sq: sq  # the sharded path: norms through a collective
    stream = list(gradient_stream(6))
    for grads in stream[:2]:  # the first steps allocate the memory and build the kernels' tables
        set_grads(params, grads)
        opt.step()
    with HostReads(lambda: _steps(opt)) as reads:
        for grads in stream[2:]:
            set_grads(params, grads)
            opt.step()
    return opt, reads.calls


@pytest.mark.parametrize("reducer", [False, True], ids=["unsharded", "reducer"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_reads_nothing_on_the_host(name, reducer):
    opt, calls = _run_reads(name, "triton", reducer)
    assert opt.executor_for(0) == "triton"
    assert calls == []
    assert opt.memory_stats()["admissions"] > 0  # the counters are read here, outside step()


def test_the_host_read_detector_sees_the_torch_executors_transfer():
    """The detector is not blind: the "torch" executor decides on the host, after one transfer per step."""
    _opt, calls = _run_reads("MemoryAugmentedAdamW", "torch")
    assert any(name in ("cpu", "numpy") and "plan.py" in caller for caller, name in calls)


def test_memory_stats_reads_the_device_counters():
    params, twin = make_params(), None
    twin = clone_params(params)
    kw = dict(lr=1e-2, topc=2, decay=0.8, key="tensor")
    opt = hf_memopt.MemoryAugmentedAdamW(params, executor="triton", **kw)
    ref = hf_memopt.MemoryAugmentedAdamW(twin, executor="torch", **kw)
    for t, _ in lockstep(gradient_stream(9), (opt, params), (ref, twin)):
        if t % 4 == 3:
            assert opt.memory_stats(reset=t != 7) == {**ref.memory_stats(reset=t != 7), "executor": "triton"}
    # reading left the ledgers on the device
    state = opt.state[params[0]]
    assert opt._engine.device_ledgers[id(state["priority_0"])][0].holds(state)


def test_switching_executors_mid_run_keeps_the_rule():
    """triton -> torch -> cpu -> triton on one optimizer: the ledger moves between host and device and every
    step still equals the SPEC reference."""
    memory = dict(topc=3, decay=0.8, kappa=1.0, aggregation="mean", key="group", buffer_dtype=None)
    params = make_params()
    ref_params = clone_params(params)
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, executor="triton", **memory)
    ref = ReferenceOptimizer("MemoryAugmentedAdamW", ref_params, lr=1e-2, **memory)
    order = ["triton", "triton", "torch", "triton", "cpu", "cpu", "triton", "torch", "triton", "triton"]
    for executor, grads in zip(order, gradient_stream(len(order))):
        if executor == "cpu" and not wanted("cpu"):
            executor = "torch"
        opt.executor = executor
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert opt.executor_for(0) == executor
        assert_same_memory(opt, ref, params)
    assert_same_params(params, ref_params)


def test_segments_of_a_flat_partition():
    """DeepSpeed ZeRO's layout: one flat tensor, one memory unit per segment; padding keeps the gradient."""
    segments = [(0, 6), (6, 10), (16, 3)]  # 19 of 21 elements, 2 of padding
    results = {}
    for executor in ("torch", "triton"):
        flat = torch.nn.Parameter(torch.linspace(-1, 1, 21))
        opt = hf_memopt.MemoryAugmentedAdamW([flat], lr=1e-2, topc=2, decay=0.7, key="tensor", executor=executor)
        opt.bind_segments(flat, segments)
        gen = torch.Generator().manual_seed(3)
        for _ in range(7):
            flat.grad = torch.randn(21, generator=gen) * torch.rand(21, generator=gen) * 10
            opt.step()
        results[executor] = (flat.detach().clone(), dict(opt.state[flat]))
    (p_torch, s_torch), (p_triton, s_triton) = results["torch"], results["triton"]
    torch.testing.assert_close(p_triton, p_torch, rtol=1e-6, atol=1e-7)
    assert s_triton["memory_count"].tolist() == s_torch["memory_count"].tolist()
    for key in ("memory_0", "memory_1", "memory_sum", "priority_0", "priority_1", "stored_at_0", "stored_at_1"):
        assert torch.equal(s_triton[key], s_torch[key]), key


def test_bf16_parameters_and_fp16_memory_equal_the_torch_executor():
    params = make_params(torch.bfloat16)
    twin = clone_params(params)
    kw = dict(lr=1e-2, topc=2, buffer_dtype="fp16", key="group")
    opt = hf_memopt.MemoryAugmentedAdamW(params, executor="triton", **kw)
    ref = hf_memopt.MemoryAugmentedAdamW(twin, executor="torch", **kw)
    step_all(gradient_stream(8, torch.bfloat16), (opt, params), (ref, twin))
    for p, q in zip(params, twin):
        assert torch.equal(p, q)  # the aggregate is rounded to bf16 as torch rounds it
        for key in ("memory_0", "memory_1", "memory_sum", "memory_count", "priority_0", "priority_1"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key


# -- choosing it -------------------------------------------------------------------------------------


def test_auto_does_not_pick_it_for_cpu_tensors():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedSGD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.executor_for(0) == "torch"


@pytest.mark.parametrize(
    "kwargs,dtype,why",
    [
        (dict(differentiable=True), torch.float32, "differentiable=True is not supported"),
        ({}, torch.float64, "parameters of dtype torch.float64"),
    ],
)
def test_it_says_why_it_cannot_run_a_group(kwargs, dtype, why):
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    opt = hf_memopt.MemoryAugmentedAdamW([p], executor="triton", **kwargs)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=why):
        opt.step()
    assert "memory_sum" not in opt.state[p] or int(opt.state[p]["memory_count"]) == 0


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from hf_memopt.engine.executors import triton_runtime

    monkeypatch.setattr(triton_runtime, "_interpreted", False)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedAdamW([p], executor="triton")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"executor='triton' cannot run param group 0: .*TRITON_INTERPRET=1"):
        opt.step()


def test_capturable_needs_the_triton_executor():
    p = torch.nn.Parameter(torch.zeros(3))
    for executor in ("torch", "auto"):
        opt = hf_memopt.MemoryAugmentedAdamW([p], executor=executor, capturable=True)
        p.grad = torch.ones(3)
        with pytest.raises(ValueError, match="capturable=True with the memory on needs"):
            opt.step()


def test_cast_limit_is_where_a_cast_overflows():
    for dtype in (torch.bfloat16, torch.float16):
        limit = torch.tensor(triton_executor.cast_limit(dtype))
        below = torch.nextafter(limit, torch.tensor(0.0))
        assert limit.to(dtype).isinf() and below.to(dtype).isfinite()
    assert triton_executor.cast_limit(torch.float32) == float("inf")


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=True)], ids=["foreach", "fused"])
@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedAdam"])
def test_adam_flags_run_torchs_own_update_on_the_aggregates(name, flags):
    """By default Adam/AdamW update inside the kernel's pass; a foreach/fused flag asks for torch's own
    implementation, which then runs on the aggregates: the same steps as the "torch" executor's."""
    if triton_runtime.interpreted_fma_rounded_twice():  # bit-exact needs the aggregate's one FMA rounding
        pytest.skip("Triton 3.6's interpreter rounds tl.fma twice (a multiply, then an add; fixed by 3.9)")
    params, twin = make_params(), make_params()
    kw = dict(OPTIMIZERS[name], topc=2, decay=0.8, **flags)
    opt = getattr(hf_memopt, name)(params, executor="triton", **kw)
    ref = getattr(hf_memopt, name)(twin, executor="torch", **kw)
    step_all(gradient_stream(8), (opt, params), (ref, twin))
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


def test_step_counters_that_differ_fall_back_to_torchs_update():
    """A parameter added later counts fewer steps than the others: the kernel's single bias correction
    cannot serve the group, so torch's own update runs on the aggregates (one per step count)."""
    params, twin = make_params(), make_params()
    opts = [
        hf_memopt.MemoryAugmentedAdamW(ps[:2], lr=1e-2, topc=2, executor=ex)
        for ps, ex in ((params, "triton"), (twin, "torch"))
    ]
    for t, grads in enumerate(gradient_stream(8, skip_every=0)):
        if t == 3:
            for opt, ps in zip(opts, (params, twin)):
                opt.param_groups[0]["params"].extend(ps[2:])  # joins the same group, at step 0
        for ps in (params, twin):
            set_grads(ps, grads)
        for opt in opts:
            opt.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opts[0].state[params[3]]["step"] == 5 and opts[0].state[params[0]]["step"] == 8


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedSGD", "CriticalMomentaAdamW"])
def test_several_param_groups_each_with_its_own_memory(name):
    """Two groups with their own topc, decay, key and buffer dtype (one launch of decide per group, the
    ledger rows of each group its own): the same memory as the "torch" executor's, step by step."""
    runs = {}
    for executor in ("torch", "triton"):
        params = make_params()
        groups = [
            {"params": params[:2], "topc": 3, "decay": 0.9, "key": "group"},
            {"params": params[2:], "topc": 2, "decay": 0.5, "key": "tensor", "buffer_dtype": "bf16"},
        ]
        base = {k: v for k, v in OPTIMIZERS[name].items() if k != "fused"}
        opt = getattr(hf_memopt, name)(groups, executor=executor, **base)
        history = []
        for grads in gradient_stream(9):
            set_grads(params, grads)
            opt.step()
            history.append(
                [
                    {k: v.clone() for k, v in opt.state[p].items() if k.startswith(("memory", "priority"))}
                    for p in params
                ]
            )
        runs[executor] = (params, history)
    for step_torch, step_triton in zip(runs["torch"][1], runs["triton"][1]):
        for a, b in zip(step_torch, step_triton):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), k
    for p, q in zip(runs["torch"][0], runs["triton"][0]):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_launches_per_step_do_not_grow_with_the_tensors(monkeypatch):
    """One launch of each kernel per param group (and dtypes), whatever the number of tensors; the host
    adds a few ops, none per tensor."""
    from test_executors import _CountOps

    kernels = triton_executor.kernels()
    launches: list[str] = []
    inside = []

    def counting(name):
        kernel = getattr(kernels, name)

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(name)
                    inside.append(1)
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        inside.pop()

                return launch

        return Counted()

    for name in ("norm_partials", "unit_sums", "decide", "apply"):
        monkeypatch.setattr(kernels, name, counting(name))

    class HostOps(_CountOps):  # the interpreter's own tensor ops inside a launch are not the step's
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if inside:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    def per_step(n_tensors):
        params = [torch.nn.Parameter(torch.randn(7)) for _ in range(n_tensors)]
        groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
        opt = hf_memopt.MemoryAugmentedAdamW(groups, topc=3, decay=0.9, executor="triton")
        gen = torch.Generator().manual_seed(0)
        for t in range(5):
            for p in params:
                p.grad = torch.randn(7, generator=gen) * (t + 1)  # growing norms: admissions and evictions
            if t < 4:
                opt.step()
        launches.clear()
        with HostOps() as mode:
            opt.step()
        return list(launches), mode.count

    few, many = per_step(6), per_step(48)
    assert few == many
    # per group: norm_partials, decide, apply; unit_sums once
    assert sorted(few[0]) == sorted(["norm_partials", "decide", "apply"] * 2 + ["unit_sums"])
    # host ops: the copy of the gradients' pointer table (new gradient tensors every step here) and
    # torch.optim's two profiler markers; the step counters, pooled into one CPU tensor per group after
    # the first steps (hf_memopt.engine.state.pool_steps), are counted through numpy, with no torch op
    assert few[1] == 1 + 2


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "CriticalMomentaAdamW"])
def test_a_tensor_lr_is_never_read_on_the_host(name):
    """lr as a tensor (what schedules on a device use): torch's update takes it as a tensor, and Critical
    Momenta's own arithmetic keeps it one; the steps equal those with the same lr as a number."""
    params, twin = make_params(), make_params()
    kw = dict(weight_decay=0.1, topc=2, decay=0.8)
    lr = torch.tensor(1e-2)
    opt = getattr(hf_memopt, name)(params, lr=lr, executor="triton", **kw)
    ref = getattr(hf_memopt, name)(twin, lr=1e-2, executor="torch", **kw)
    stream = list(gradient_stream(6))
    step_all(stream[:2], (opt, params), (ref, twin))
    with HostReads(lambda: _steps(opt)) as reads:
        step_all(stream[2:], (opt, params))
    step_all(stream[2:], (ref, twin))
    assert opt.param_groups[0]["lr"] is lr and id(lr) not in reads.read_ids
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedSGD", "CriticalMomentaAdamW"])
def test_tensors_of_several_chunks(name):
    """Tensors larger than one 16K-element chunk (the other tests' tensors fit in one): norms summed over
    chunks, every chunk aggregated, admitted and updated; the same memory as the "torch" executor's, whose
    CPU norms are the C kernel's (fp64 sums in another in-chunk order, equal once rounded to fp32)."""
    shapes = [(40000,), (128, 128), (5,)]  # 3 chunks, exactly 1, a fraction of one
    runs = {}
    for executor in ("torch", "triton"):
        params = make_params(shapes=shapes)
        base = {k: v for k, v in OPTIMIZERS[name].items() if k != "fused"}
        opt = getattr(hf_memopt, name)(params, executor=executor, topc=2, decay=0.8, buffer_dtype="bf16", **base)
        for grads in gradient_stream(6, shapes=shapes):
            set_grads(params, grads)
            opt.step()
        runs[executor] = (params, opt)
    (p_torch, o_torch), (p_triton, o_triton) = runs["torch"], runs["triton"]
    for p, q in zip(p_torch, p_triton):
        a, b = o_torch.state[p], o_triton.state[q]
        for key in ("memory_0", "memory_1", "memory_sum", "memory_count", "priority_0", "priority_1", "stored_at_0"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
