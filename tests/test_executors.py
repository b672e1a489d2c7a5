"""Executor choice and the torch implementation flags: what runs is what the user asked for.

The expectation for the flags is torch's own optimizer: with the same flags, the same torch
implementation (for-loop, foreach or fused) must run, and give the same parameters.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from executors_available import needs, require_or_skip
from streams import clone_params, gradient_stream, make_params, set_grads
from torch.utils._python_dispatch import TorchDispatchMode

import hf_memopt
from hf_memopt.engine.executors import cpu_kernel

CASES = [
    ("MemoryAugmentedAdamW", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ("MemoryAugmentedAdamW", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("MemoryAugmentedAdam", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("MemoryAugmentedAdam", torch.optim.Adam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1)),
    ("MemoryAugmentedSGD", torch.optim.SGD, dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("MemoryAugmentedSGD", torch.optim.SGD, dict(lr=1e-3, momentum=0.9, dampening=0.1, maximize=True)),
    ("MemoryAugmentedRMSprop", torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.1)),
    ("MemoryAugmentedRMSprop", torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, maximize=True)),
]
FLAGS = {"default": {}, "for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
_IMPLS = {
    importlib.import_module("torch.optim.adam"): ("_single_tensor_adam", "_multi_tensor_adam", "_fused_adam"),
    importlib.import_module("torch.optim.sgd"): ("_single_tensor_sgd", "_multi_tensor_sgd", "_fused_sgd"),
    importlib.import_module("torch.optim.rmsprop"): ("_single_tensor_rmsprop", "_multi_tensor_rmsprop"),
}


@pytest.fixture
def implementations(monkeypatch):
    """Records which of torch's update implementations run (torch's functional API looks them up by name)."""
    ran: list[str] = []
    for module, names in _IMPLS.items():
        for name in names:
            real = getattr(module, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                ran.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
    return ran


def _run(opt, params, steps=10):
    for grads in gradient_stream(steps):
        set_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("name,torch_cls,kwargs", CASES)
@pytest.mark.parametrize("flag", list(FLAGS))
@pytest.mark.parametrize("executor", ["auto", "torch"])
def test_kappa_zero_is_torch_with_the_same_flags(name, torch_cls, kwargs, flag, executor, implementations):
    if flag == "fused" and torch_cls is torch.optim.RMSprop:
        pytest.skip("torch has no fused RMSprop")
    params = make_params()
    ref_params = clone_params(params)
    opt = getattr(hf_memopt, name)(params, kappa=0.0, executor=executor, **kwargs, **FLAGS[flag])
    ref = torch_cls(ref_params, **kwargs, **FLAGS[flag])
    _run(ref, ref_params)
    torch_ran = list(implementations)
    implementations.clear()
    _run(opt, params)
    assert implementations == torch_ran  # the implementation torch picks for these flags, every step
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    for p in params:
        assert not any(k.startswith(("memory_", "priority_")) for k in opt.state[p]), "kappa=0 allocates no memory"
    assert opt.executor_for(0) == "torch"


@pytest.mark.parametrize("name,torch_cls,kwargs", CASES)
@pytest.mark.parametrize("flag", ["for-loop", "foreach", "fused"])
def test_memory_on_runs_torch_with_the_same_flags(name, torch_cls, kwargs, flag, implementations):
    if flag == "fused" and torch_cls is torch.optim.RMSprop:
        pytest.skip("torch has no fused RMSprop")
    ref_params = make_params()
    torch_cls(ref_params, **kwargs, **FLAGS[flag])
    for p in ref_params:
        p.grad = torch.ones_like(p)
    torch_cls(ref_params, **kwargs, **FLAGS[flag]).step()
    torch_ran = list(implementations)
    implementations.clear()
    params = make_params()
    opt = getattr(hf_memopt, name)(params, topc=2, **kwargs, **FLAGS[flag])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert implementations == torch_ran
    assert opt.executor_for(0) == "torch"


def test_cpu_executor_is_refused_with_kappa_zero():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = hf_memopt.MemoryAugmentedAdamW([p], kappa=0.0, executor="cpu")
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"executor='cpu' cannot run param group 0: kappa=0 turns the memory off"):
        opt.step()


@pytest.mark.parametrize("value", ["gpu", "Torch", None, 3])
def test_unknown_executor_names_the_argument(value):
    with pytest.raises(ValueError, match=r"executor must be one of 'auto', 'torch', 'cpu', 'triton'"):
        hf_memopt.MemoryAugmentedAdamW([torch.nn.Parameter(torch.zeros(1))], executor=value)


@pytest.mark.parametrize(
    "cls,kwargs,params,why",
    [
        (hf_memopt.MemoryAugmentedSGD, {}, None, "base update has no CPU kernel"),
        (hf_memopt.MemoryAugmentedRMSprop, {}, None, "base update has no CPU kernel"),
        (hf_memopt.MemoryAugmentedAdamW, dict(foreach=True), None, "foreach=True asks for torch's own"),
        (hf_memopt.MemoryAugmentedAdamW, dict(fused=True), None, "fused=True asks for torch's own"),
        (hf_memopt.MemoryAugmentedAdamW, dict(buffer_dtype="fp16"), None, "kernel stores fp32 or bf16"),
        (hf_memopt.MemoryAugmentedAdamW, dict(lr=torch.tensor(1e-3)), None, "lr and betas must be Python numbers"),
        (hf_memopt.MemoryAugmentedAdamW, {}, torch.bfloat16, "contiguous fp32 CPU tensors"),
    ],
)
def test_cpu_executor_says_why_it_cannot_run_a_group(cls, kwargs, params, why):
    require_or_skip("cpu")
    p = torch.nn.Parameter(torch.zeros(3, dtype=params or torch.float32))
    opt = cls([p], executor="cpu", **kwargs)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=f"executor='cpu' cannot run param group 0: .*{why}"):
        opt.step()


@needs("cpu")
def test_auto_picks_per_group_and_reports_it():
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    d = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = hf_memopt.MemoryAugmentedAdamW(
        [{"params": [a]}, {"params": [b], "foreach": True}, {"params": [c], "kappa": 0.0}, {"params": [d]}]
    )
    assert opt.executor_for(0) is None  # nothing ran yet
    for p in (a, b, c, d):
        p.grad = torch.ones_like(p)
    opt.step()
    assert [opt.executor_for(i) for i in range(4)] == ["cpu", "torch", "torch", "torch"]
    assert opt.executor_for(opt.param_groups[0]) == "cpu"
    assert opt.memory_stats()["executor"] == "cpu,torch"


def test_the_executor_is_not_saved_in_checkpoints():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedAdamW([p], executor="torch")
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    assert "executor" not in sd["param_groups"][0] and "executor" not in repr(sd).replace("'executor'", "")
    other = hf_memopt.MemoryAugmentedAdamW([p], executor="auto")
    other.load_state_dict(sd)
    assert other.executor == "auto"


@pytest.mark.parametrize("cls", [hf_memopt.MemoryAugmentedAdamW, hf_memopt.MemoryAugmentedSGD])
def test_a_parameter_listed_twice_in_a_group_is_an_error(cls):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="params: a parameter is listed twice in one param group"):
        cls([p, p])
    opt = cls([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [p, p]})


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that do work (views and metadata ops launch nothing on a device)."""

    _FREE = ("view", "alias", "detach", "_unsafe_view", "as_strided", "narrow", "slice", "select", "lift_fresh")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self._FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_tensors: int, memory: bool, **kwargs) -> int:
    params = [torch.nn.Parameter(torch.randn(7)) for _ in range(n_tensors)]
    if memory:
        opt = hf_memopt.MemoryAugmentedAdamW(params, topc=3, decay=0.9, executor="torch", **kwargs)
    else:
        opt = torch.optim.AdamW(params, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        for p in params:
            p.grad = torch.randn(7, generator=gen) * (t + 1)  # growing norms: every step admits and evicts
        if t < 4:
            opt.step()
    with _CountOps() as mode:
        opt.step()
    return mode.count


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True)], ids=["fused", "foreach"])
def test_the_memory_launches_as_many_ops_for_many_tensors_as_for_few(flags):
    """The memory's part of a step (ours minus torch's AdamW with the same flags) is multi-tensor: its
    op count does not grow with the number of tensors."""
    few = _ops_per_step(6, True, **flags) - _ops_per_step(6, False, **flags)
    many = _ops_per_step(48, True, **flags) - _ops_per_step(48, False, **flags)
    assert few == many, (few, many)
    assert few <= 20


@needs("cpu")
def test_a_kernel_whose_tables_are_laid_out_differently_is_refused(monkeypatch):
    """The columns are named in the C source and restated in cpu_kernel; the loader compares the two."""
    assert cpu_kernel.load().memopt_layout().decode() == cpu_kernel.COLUMNS.layout()
    swapped = cpu_kernel.Table("GRAD", "PARAM", *cpu_kernel.COLUMNS.step_ptrs.names[2:])
    monkeypatch.setattr(cpu_kernel.COLUMNS, "step_ptrs", swapped)
    cpu_kernel.load.cache_clear()
    try:
        with pytest.raises(cpu_kernel.LayoutMismatchError, match="step_ptrs:PARAM,GRAD,"):
            cpu_kernel.load()
    finally:
        monkeypatch.undo()
        cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None


@needs("cpu")
@pytest.mark.parametrize(
    "where, name, value",
    [("aggregation", "sum", 5), ("rule", "REFRESH_INTERVAL", 64), ("rule", "CHUNK", 8192), ("rule", "MODE_EVICT", 3)],
)
def test_a_kernel_whose_numeric_codes_differ_is_refused(monkeypatch, where, name, value):
    """Modes, aggregations, momentum kinds, the norm chunk and the refresh interval mean the same numbers in
    Python and in C: the loader compares the library's ``memopt_codes()`` with ``cpu_kernel.codes()``."""
    from hf_memopt.engine import rule

    if where == "aggregation":
        monkeypatch.setitem(cpu_kernel.AGGREGATION_CODES, name, value)
    else:
        monkeypatch.setattr(rule, name, value)
    cpu_kernel.load.cache_clear()
    try:
        with pytest.raises(cpu_kernel.LayoutMismatchError, match="has the codes"):
            cpu_kernel.load()
    finally:
        monkeypatch.undo()
        cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None
