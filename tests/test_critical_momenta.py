"""Critical Momenta (SPEC section 1b): ``CriticalMomentaAdamW`` against the slow literal reference
(``tests/reference_cm.py``) on every executor that runs it, decisions checked after every step.

Executors (the rows), as in ``tests/test_rule_matrix.py``: "torch" (multi-tensor torch ops; on CPU its
norms are the kernel's), "torch, foreach norms" (``torch._foreach_norm`` in fp64, what other devices
take), "cpu" (the whole step in C) and "cpu, host decisions" (numpy rule, C update: sharded runs).
Every row advances m as torch's ``lerp`` does (the C loop with torch's fused multiply-add formula), so
exp_avg and the stored momenta are compared with the reference's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from executors_available import needs
from reference_cm import ReferenceCriticalMomenta
from streams import clone_params, gradient_stream, lockstep, make_params, set_grads, step_all
from test_rule_matrix import EXECUTORS, bounded, row

import hf_memopt
from hf_memopt.engine.rule import REFRESH_INTERVAL

ROWS = [row(ex, executor=ex, id=ex) for ex in EXECUTORS]
BASE = dict(lr=1e-2, weight_decay=0.1)


def run(executor, streams, monkeypatch, memory, base=None, params=None):
    """Run CriticalMomentaAdamW on ``executor`` and the reference side by side over ``streams``."""
    kwargs, setup, test_setup = EXECUTORS[executor]
    if test_setup is not None:
        test_setup(monkeypatch)
    if executor.startswith("cpu") and memory.get("buffer_dtype") not in (None, torch.float32, torch.bfloat16):
        pytest.skip("the CPU kernel stores fp32 or bf16 memory")
    if executor.startswith("cpu") and memory["kappa"] == 0:
        pytest.skip("kappa=0 runs torch's own AdamW; the cpu executor refuses it")
    base = BASE if base is None else base
    params = params if params is not None else make_params()
    ref_params = clone_params(params)
    opt = hf_memopt.CriticalMomentaAdamW(params, **base, **memory, **kwargs)
    if setup is not None:
        setup(opt)
    ref = ReferenceCriticalMomenta(ref_params, **memory, **base)
    for _ in lockstep(streams, (opt, params), (ref, ref_params)):
        if memory["kappa"] > 0:
            assert_same_memory(opt, ref, params)  # the decisions of every step, not only the last
    assert opt.executor_for(0) == ("torch" if memory["kappa"] == 0 else kwargs["executor"])
    return opt, ref, params, ref_params


def assert_same_memory(opt, ref, params):
    """Decisions exactly (what is stored, where), exp_avg = m (never m~) and the stored momenta bit for
    bit, priorities to 1e-6, S to its rounding."""
    tol = dict(rtol=0, atol=0)
    for i, p in enumerate(params):
        stored = ref.stored(i)
        state = opt.state[p]
        assert int(state["memory_count"]) == len(stored), f"tensor {i}: count"
        torch.testing.assert_close(state["exp_avg"], ref.m[i], **tol, equal_nan=True, msg=f"tensor {i}: exp_avg is m")
        for j, (value, priority) in enumerate(stored):
            got = state[f"memory_{j}"]
            assert got.dtype == value.dtype
            torch.testing.assert_close(got, value, **tol, msg=f"tensor {i} slot {j}")
            assert state[f"priority_{j}"].item() == pytest.approx(priority, rel=1e-6), f"tensor {i} slot {j}"
        if stored:
            total = torch.stack([v.double() for v, _ in stored]).sum(0)
            scale = max(float(total.abs().max()), max(float(v.double().abs().max()) for v, _ in stored), 1e-30)
            torch.testing.assert_close(state["memory_sum"].double(), total, rtol=1e-5, atol=8 * 1.2e-7 * scale)


def assert_same_params(params, ref_params, rtol=1e-5, atol=1e-6):
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, equal_nan=True)


# -- the random-stream matrix: key x kappa x buffer_dtype x topc x decay ------------------------------

KAPPAS = [0.0, 0.5, 1.0, 2.0]
TOPC_DECAY = [(1, 0.7), (3, 0.99), (5, 0.5), (2, 1.0)]


@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("key", ["group", "tensor"])
@pytest.mark.parametrize("executor", ROWS)
def test_random_streams(executor, key, kappa, buffer_dtype, monkeypatch):
    """A tensor misses its gradient every third step; (topc, decay) cycle with the other axes."""
    index = KAPPAS.index(kappa) + 2 * ["group", "tensor"].index(key)
    topc, decay = TOPC_DECAY[index % len(TOPC_DECAY)]
    bounded(executor, "cm", key, kappa, str(buffer_dtype))
    memory = dict(topc=topc, decay=decay, kappa=kappa, key=key, buffer_dtype=buffer_dtype)
    stream = list(gradient_stream(14))
    opt, ref, params, ref_params = run(executor, stream, monkeypatch, memory)
    assert_same_params(params, ref_params)
    if kappa == 0:
        assert not any(k.startswith("memory_") for p in params for k in opt.state[p])


@pytest.mark.parametrize(
    "base",
    [dict(lr=1e-2, amsgrad=True), dict(lr=1e-2, maximize=True, weight_decay=0.0), dict(lr=3e-3, betas=(0.6, 0.9))],
    ids=["amsgrad", "maximize", "beta1<0.5-lerp"],
)
@pytest.mark.parametrize("executor", ROWS)
def test_adamw_flags(executor, base, monkeypatch):
    memory = dict(topc=3, decay=0.8, kappa=1.0, key="tensor", buffer_dtype=None)
    opt, ref, params, ref_params = run(executor, list(gradient_stream(10)), monkeypatch, memory, base)
    assert_same_params(params, ref_params)


@pytest.mark.parametrize("executor", ROWS)
def test_the_first_step_is_an_ordinary_step(executor, monkeypatch):
    """Unlike the reference code, step 1 moves the parameters and stores m = (1 - beta1) g, not g."""
    memory = dict(topc=2, decay=0.7, kappa=1.0, key="tensor", buffer_dtype=None)
    params = [torch.zeros(3, requires_grad=True)]
    g = torch.tensor([1.0, -2.0, 4.0])
    opt, ref, params, _ = run(executor, [[g]], monkeypatch, memory, dict(lr=0.1, weight_decay=0.0), params)
    torch.testing.assert_close(opt.state[params[0]]["memory_0"], 0.1 * g, rtol=1e-6, atol=0)
    # m~ = m = 0.1 g and v = 0.001 m^2 (v is built from m~, SPEC 1b.5, not from g as in AdamW): the
    # bias-corrected step is lr * m / |m| * sqrt(1 - beta2) / sqrt(1 - beta2) / (1 - beta1) = 10 lr sign(g)
    torch.testing.assert_close(params[0].detach(), -1.0 * g.sign(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("executor", ROWS)
def test_exp_avg_stays_m_and_the_aggregate_feeds_the_update(executor, monkeypatch):
    memory = dict(topc=3, decay=1.0, kappa=2.0, key="tensor", buffer_dtype=None)
    stream = [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])], [torch.tensor([1.0, 1.0])]]
    params = [torch.zeros(2, requires_grad=True)]
    opt, ref, params, ref_params = run(executor, stream, monkeypatch, memory, dict(lr=0.1, weight_decay=0.0), params)
    assert_same_params(params, ref_params, rtol=1e-6, atol=1e-7)
    st = opt.state[params[0]]
    m1 = torch.tensor([0.1, 0.0])
    m2 = 0.9 * m1 + torch.tensor([0.0, 0.1])
    m3 = 0.9 * m2 + torch.tensor([0.1, 0.1])
    torch.testing.assert_close(st["exp_avg"], m3)
    torch.testing.assert_close(st["memory_sum"], m1 + m2 + m3)


@pytest.mark.parametrize(
    "buffer_dtype,g,beta1,stored",
    [
        # fp16 memory: a gradient of 1e5 is not finite in fp16, but m = 0.1 g = 1e4 is: m is stored
        (torch.float16, 1e5, 0.9, True),
        # 7e5: m = 7e4 > 65504 is not finite in fp16: not stored
        (torch.float16, 7e5, 0.9, False),
        # bf16 memory: g = 3.4e38 is finite in fp32, not in bf16; m = 3.4e37 is: m is stored
        (torch.bfloat16, 3.4e38, 0.9, True),
        # beta1 = 0: m = g, past bf16's largest finite value: not stored
        (torch.bfloat16, 3.4e38, 0.0, False),
    ],
    ids=["fp16-m-fits", "fp16-m-overflows", "bf16-m-fits", "bf16-m-overflows"],
)
@pytest.mark.parametrize("executor", ROWS)
def test_castability_is_tested_on_m_not_g(executor, buffer_dtype, g, beta1, stored, monkeypatch):
    """SPEC 1.3's test applies to the value stored: the momentum (after its lerp), not the gradient."""
    memory = dict(topc=3, decay=0.9, kappa=1.0, key="tensor", buffer_dtype=buffer_dtype)
    base = dict(lr=1e-2, weight_decay=0.0, betas=(beta1, 0.999))
    big = torch.tensor([g, 1.0, 0.0])
    stream = [[big]] + [[torch.tensor([0.5, -1.0, 2.0])]] * 2
    params = [torch.zeros(3, requires_grad=True)]
    opt, ref, params, ref_params = run(executor, stream, monkeypatch, memory, base, params)
    st = opt.state[params[0]]
    assert int(st["memory_count"]) == (3 if stored else 2)
    assert torch.isfinite(st["memory_sum"]).all()


@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16], ids=["param-dtype", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("executor", ROWS)
def test_a_momentum_poisoned_by_a_non_finite_gradient_is_never_stored(executor, bad, buffer_dtype, monkeypatch):
    """A finite k says g is finite, not m: after one non-finite g, m stays non-finite and is never stored
    again (SPEC 1.3 applied to m), though later gradients are finite."""
    memory = dict(topc=3, decay=0.9, kappa=1.0, key="tensor", buffer_dtype=buffer_dtype)
    good = [torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])]
    stream = [good, [torch.tensor([bad, 1.0]), good[1]], good, good, good]
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt, ref, params, _ = run(executor, stream, monkeypatch, memory, dict(lr=1e-2, weight_decay=0.0), params)
    assert int(opt.state[params[0]]["memory_count"]) == 1  # step 1's m only
    assert int(opt.state[params[1]]["memory_count"]) == 3
    assert not torch.isfinite(opt.state[params[0]]["exp_avg"]).all()


@needs("cpu")
def test_the_kernel_forgets_its_bound_on_m_when_another_executor_wrote_m(monkeypatch):
    """The C kernel skips its pass over m while a bound on |m| says m is finite; a step by the "torch"
    executor in between (a NaN gradient poisons m there) must void that bound."""
    memory = dict(topc=3, decay=0.9, kappa=1.0, key="tensor", buffer_dtype=torch.bfloat16)
    params = [torch.zeros(2, requires_grad=True)]
    ref_params = clone_params(params)
    opt = hf_memopt.CriticalMomentaAdamW(params, lr=1e-2, **memory, executor="cpu")
    ref = ReferenceCriticalMomenta(ref_params, lr=1e-2, **memory)
    stream = (
        [[torch.tensor([1.0, -1.0])]] * 2 + [[torch.tensor([float("nan"), 1.0])]] + [[torch.tensor([2.0, 1.0])]] * 2
    )
    for t, grads in enumerate(stream):
        opt.executor = "torch" if t == 2 else "cpu"
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_same_memory(opt, ref, params)
    assert opt.executor_for(0) == "cpu" and int(opt.state[params[0]]["memory_count"]) == 2


@pytest.mark.parametrize("executor", ROWS)
def test_the_refresh_of_s(executor, monkeypatch):
    """Past REFRESH_INTERVAL steps S is rebuilt exactly from the slots: still equal to the reference."""
    memory = dict(topc=4, decay=0.9, kappa=1.0, key="tensor", buffer_dtype=None)
    stream = list(gradient_stream(REFRESH_INTERVAL, skip_every=0))
    opt, ref, params, ref_params = run(executor, stream, monkeypatch, memory, dict(lr=1e-4))
    assert_same_params(params, ref_params, rtol=1e-4, atol=1e-5)
    for p in params:
        st = opt.state[p]
        exact = st["memory_0"].float()
        for i in range(1, int(st["memory_count"])):
            exact = exact + st[f"memory_{i}"].float()
        assert torch.equal(st["memory_sum"], exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters(dtype, monkeypatch):
    memory = dict(topc=3, decay=0.7, kappa=1.0, key="group", buffer_dtype=None)
    params = make_params(dtype)
    ref_params = clone_params(params)
    opt = hf_memopt.CriticalMomentaAdamW(params, lr=1e-2, **memory, executor="torch")
    ref = ReferenceCriticalMomenta(ref_params, lr=1e-2, **memory)
    step_all(gradient_stream(8, dtype), (opt, params), (ref, ref_params))
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype and opt.state[p]["memory_sum"].dtype == torch.float32
        assert int(opt.state[p]["memory_count"]) == len(ref.stored(i))
        # equal_nan: in fp16, eps=1e-8 rounds to 0 and a zero m~ with a zero v gives 0/0 on both sides
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-2, equal_nan=True)


# -- kappa=0 is torch.optim.AdamW, every flag -------------------------------------------------------

FLAGS = {"default": {}, "for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("base", [dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, amsgrad=True, maximize=True)])
@pytest.mark.parametrize("flag", list(FLAGS))
def test_kappa_zero_is_adamw_with_the_same_flags(flag, base):
    params = make_params()
    ref_params = clone_params(params)
    opt = hf_memopt.CriticalMomentaAdamW(params, kappa=0.0, **base, **FLAGS[flag])
    ref = torch.optim.AdamW(ref_params, **base, **FLAGS[flag])
    step_all(gradient_stream(10), (opt, params), (ref, ref_params))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
        assert opt.state[p].keys() == ref.state[q].keys()


# -- arguments ----------------------------------------------------------------------------------------


def test_arguments_and_defaults():
    p = [torch.zeros(2, requires_grad=True)]
    opt = hf_memopt.CriticalMomentaAdamW(p)
    g = opt.param_groups[0]
    assert (g["topc"], g["decay"], g["kappa"], g["key"], g["buffer_dtype"]) == (5, 0.7, 1.0, "group", None)
    assert g["weight_decay"] == 1e-2 and g["betas"] == (0.9, 0.999)
    assert hf_memopt.CriticalMomentaAdamW(p, buffer_dtype="bf16").param_groups[0]["buffer_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="aggregation"):
        hf_memopt.CriticalMomentaAdamW(p, aggregation="mean")
    with pytest.raises(ValueError, match="aggregation"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "aggregation": "mid"})
    for bad in (dict(topc=0), dict(decay=0.0), dict(kappa=-1.0), dict(key="layer"), dict(buffer_dtype="int8")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            hf_memopt.CriticalMomentaAdamW(p, **bad)
    with pytest.raises(ValueError, match="capturable"):
        opt2 = hf_memopt.CriticalMomentaAdamW(p, capturable=True)
        p[0].grad = torch.ones(2)
        opt2.step()


# -- the torch executor is multi-tensor ---------------------------------------------------------------


def test_the_torch_executor_launches_as_many_ops_for_many_tensors_as_for_few():
    from test_executors import _CountOps

    def ops(n_tensors):
        params = [torch.nn.Parameter(torch.randn(7)) for _ in range(n_tensors)]
        opt = hf_memopt.CriticalMomentaAdamW(params, topc=3, decay=0.9, amsgrad=True, executor="torch")
        gen = torch.Generator().manual_seed(0)
        for t in range(5):
            for p in params:
                p.grad = torch.randn(7, generator=gen) * (t + 1)  # growing norms: admissions and evictions
            if t < 4:
                opt.step()
        with _CountOps() as mode:
            opt.step()
        return mode.count

    few, many = ops(6), ops(48)
    assert few == many, (few, many)
