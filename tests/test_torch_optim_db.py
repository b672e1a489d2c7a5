"""Every optimizer through the configurations of torch's own optimizer tests (issue 22, item 8).

The configurations come from the installed torch (``torch.testing._internal.common_optimizers.optim_db``,
the table torch's ``TestOptimRenewed`` runs), not from a copy of torch's test file: a torch upgrade that adds
a configuration adds it here. The contracts held are the ones that harness checks:

* with the memory off (kappa=0) every configuration, under every implementation torch has on CPU
  (for-loop, foreach, fused), equals torch's optimizer bit for bit, or is refused as torch refuses it;
* with the memory on: ``state_dict`` round trips (named parameters, ``weights_only``, an older checkpoint
  whose ``step`` is a number), ``deepcopy``, user hooks, steps without gradients, per-group lr and weight
  decay, the implementations agreeing with each other, and a tensor lr of every shape torch accepts;
* the deliberate refusals (complex parameters and ``differentiable=True`` with the memory on, a parameter
  listed twice) are errors naming what to do, and the README lists each with its reason.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
from streams import gradient_stream
from torch.testing._internal.common_optimizers import optim_db

import hf_memopt

INFOS = {info.optim_cls: info for info in optim_db}
OURS = {
    hf_memopt.MemoryAugmentedAdamW: torch.optim.AdamW,
    hf_memopt.CriticalMomentaAdamW: torch.optim.AdamW,
    hf_memopt.MemoryAugmentedAdam: torch.optim.Adam,
    hf_memopt.MemoryAugmentedSGD: torch.optim.SGD,
    hf_memopt.MemoryAugmentedRMSprop: torch.optim.RMSprop,
}
SHAPES = [(5, 3), (3,), (2, 2, 2)]


def _impls(torch_cls):
    """torch's implementations on CPU for this optimizer: for-loop, foreach and (where it has one) fused."""
    info = INFOS[torch_cls]
    impls = [("forloop", {"foreach": False}), ("foreach", {"foreach": True})]
    if "fused" in info.supported_impls and "cpu" in info.supports_fused_on:
        impls.append(("fused", {"fused": True}))
    return impls


def _inputs(torch_cls):
    return INFOS[torch_cls].optim_inputs_func("cpu", torch.float32)


def _clone(kwargs):
    """The kwargs with tensors copied (an lr tensor is not shared between optimizers)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in kwargs.items()}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _grads(steps, seed=1):
    return list(gradient_stream(steps, seed=seed, shapes=SHAPES))


def _run(opt, params, grads):
    for g in grads:
        for p, x in zip(params, g):
            p.grad = None if x is None else x.clone()
        opt.step()


def _same(opt_a, params_a, opt_b, params_b, exact=True):
    for p, q in zip(params_a, params_b):
        if exact:
            assert torch.equal(p, q)
        else:  # torch's harness: fp32 defaults, rtol loosened for the reordered sums of foreach and fused
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            if exact:
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k])), k
            else:
                torch.testing.assert_close(torch.as_tensor(sb[k]), torch.as_tensor(v), rtol=1e-5, atol=1e-5)


# -- the memory off: torch's optimizer, bit for bit -----------------------------------------------


def _kappa0_cases():
    for ours, theirs in OURS.items():
        for inp in _inputs(theirs):
            for impl, flags in _impls(theirs):
                yield pytest.param(ours, theirs, {**inp.kwargs, **flags}, id=f"{ours.__name__}-{inp.desc}-{impl}")


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), list(_kappa0_cases()))
def test_kappa0_equals_torch_bitwise(ours, theirs, kwargs):
    params, twin = _params(), _params()
    try:
        reference = theirs(twin, **_clone(kwargs))
    except (ValueError, RuntimeError, TypeError) as err:
        with pytest.raises(type(err)):
            ours(params, kappa=0, **_clone(kwargs))
        return
    opt = ours(params, kappa=0, **_clone(kwargs))
    for g in _grads(4):
        _run(reference, twin, [g])
        _run(opt, params, [g])
        _same(reference, twin, opt, params)


# -- the memory on: the contracts of torch's harness -------------------------------------------------


def _memory_cases():
    for ours, theirs in OURS.items():
        for inp in _inputs(theirs):
            yield pytest.param(ours, inp.kwargs, id=f"{ours.__name__}-{inp.desc}")


MEMORY_CASES = list(_memory_cases())
MEMORY = dict(topc=2, decay=0.8)


def _named(params):
    return [(f"p{i}", p) for i, p in enumerate(params)]


def _weights_only(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _older(state_dict):
    """A checkpoint as older torch wrote it: ``step`` a Python number (torch's test_load_nontensor_step)."""
    out = copy.deepcopy(state_dict)
    for state in out["state"].values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].item()
    return out


@pytest.mark.parametrize(("ours", "kwargs"), MEMORY_CASES)
@pytest.mark.parametrize("how", ["named+weights_only", "older"])
def test_a_state_dict_round_trip_continues_bit_for_bit(ours, kwargs, how):
    grads = _grads(8)
    params = _params()
    opt = ours(_named(params), **MEMORY, **_clone(kwargs))
    _run(opt, params, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    if how == "older":
        saved = _older(saved)
    else:
        assert saved["param_groups"][0]["param_names"] == [f"p{i}" for i in range(len(params))]
        saved = _weights_only(saved)
    resumed = [p.detach().clone().requires_grad_() for p in params]
    opt2 = ours(_named(resumed), **MEMORY, **_clone(kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(saved)
    _run(opt, params, grads[4:])
    _run(opt2, resumed, grads[4:])
    _same(opt, params, opt2, resumed)


@pytest.mark.parametrize(("ours", "kwargs"), MEMORY_CASES)
def test_deepcopy_hooks_and_steps_without_gradients(ours, kwargs):
    grads = _grads(6)
    params = _params()
    opt = ours(params, **MEMORY, **_clone(kwargs))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "mine": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    _run(opt, params, grads[:3])
    assert calls == ["pre", "post"] * 3

    # a step where no parameter has a gradient changes nothing (torch skips parameters without one)
    before = copy.deepcopy(opt.state_dict())
    kept = [p.detach().clone() for p in params]
    _run(opt, params, [[None] * len(params)])
    assert all(torch.equal(p, q) for p, q in zip(params, kept))
    after = opt.state_dict()
    assert after["mine"] == 1 and after["memory_holds"] == before["memory_holds"]
    for pid, state in before["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(after["state"][pid][k]), torch.as_tensor(v)), k

    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    _run(opt, params, grads[3:])
    _run(twin, twin_params, grads[3:])
    _same(opt, params, twin, twin_params)

    # the user's load hooks run around ours; ours still restores the memory's own dtypes
    other = ours([p.detach().clone().requires_grad_() for p in params], **MEMORY, **_clone(kwargs))
    other.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    other.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    other.load_state_dict(opt.state_dict())
    assert calls[-2:] == ["load-pre", "load-post"]
    p0 = other.param_groups[0]["params"][0]
    assert other.state[p0]["priority_0"].dtype == torch.float32 and other.state[p0]["memory_count"].dtype == torch.int64


@pytest.mark.parametrize(("ours", "kwargs"), MEMORY_CASES)
def test_param_group_lr_and_weight_decay_are_each_groups_own(ours, kwargs):
    """Two groups with their own lr and weight decay step as two optimizers, one per group (key="tensor":
    the priorities do not mix groups)."""
    grads = _grads(5)
    params, twin = _params(), _params()
    lr = kwargs.get("lr", INFOS[OURS[ours]].optim_cls([torch.zeros(1)]).defaults["lr"])
    second = {"lr": float(lr) * 0.5, "weight_decay": 0.05}
    opt = ours([{"params": params[:2]}, {"params": params[2:], **second}], key="tensor", **MEMORY, **_clone(kwargs))
    first = ours(twin[:2], key="tensor", **MEMORY, **_clone(kwargs))
    other = ours(twin[2:], key="tensor", **MEMORY, **{**_clone(kwargs), **second})
    for g in grads:
        _run(opt, params, [g])
        for o, ps, gs in ((first, twin[:2], g[:2]), (other, twin[2:], g[2:])):
            _run(o, ps, [gs])
    _same(opt, params[:2], first, twin[:2])
    _same(opt, params[2:], other, twin[2:])


@pytest.mark.parametrize(("ours", "kwargs"), MEMORY_CASES)
def test_the_implementations_agree_with_the_memory_on(ours, kwargs):
    """for-loop, foreach and fused (torch's harness: test_foreach_matches_forloop, test_fused_matches_forloop)."""
    grads = _grads(6)
    runs = []
    for _impl, flags in _impls(OURS[ours]):
        params = _params()
        try:
            opt = ours(params, **MEMORY, **_clone(kwargs), **flags)
        except ValueError:
            with pytest.raises(ValueError):  # refused as torch refuses it (e.g. a tensor lr with foreach)
                OURS[ours](_params(), **_clone(kwargs), **flags)
            continue
        _run(opt, params, grads)
        runs.append((opt, params))
    assert len(runs) >= 2
    reference, ref_params = runs[0]
    for opt, params in runs[1:]:
        _same(reference, ref_params, opt, params, exact=False)
        for p, q in zip(ref_params, params):  # the memory decided the same: same slots filled
            assert int(reference.state[p]["memory_count"]) == int(opt.state[q]["memory_count"])


def _tensor_lr_cases():
    for ours, theirs in OURS.items():
        for impl, flags in _impls(theirs):
            yield pytest.param(ours, flags, id=f"{ours.__name__}-{impl}")


@pytest.mark.parametrize(("ours", "flags"), list(_tensor_lr_cases()))
def test_a_tensor_lr_of_every_shape_torch_accepts(ours, flags):
    """torch takes a one-element lr tensor of any shape; so does every optimizer with the memory on, and the shape
    does not change a bit of the result."""
    grads = _grads(5)
    results = []
    for shape in [(), (1,), (1, 1)]:
        lr = torch.full(shape, 1e-2)
        try:
            OURS[ours](_params(), lr=lr.clone(), **flags)
        except ValueError:  # torch refuses it (Adam(W): a tensor lr with foreach=True needs capturable): so do we
            with pytest.raises(ValueError, match="lr as a Tensor"):
                ours(_params(), lr=lr, **MEMORY, **flags)
            return
        params = _params()
        opt = ours(params, lr=lr, **MEMORY, **flags)
        _run(opt, params, grads)
        assert opt.memory_stats()["admissions"] > 0
        results.append((opt, params))
    for opt, params in results[1:]:
        _same(results[0][0], results[0][1], opt, params)


# -- the deliberate refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("ours", list(OURS))
def test_the_deliberate_refusals_name_what_to_do(ours):
    with pytest.raises(ValueError, match="listed twice"):
        p = torch.zeros(2, requires_grad=True)
        ours([p, p])
    complex_param = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    opt = ours([complex_param])
    complex_param.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex parameters are not supported with the memory on .*kappa=0"):
        opt.step()
    real = torch.zeros(2, requires_grad=True)
    opt = ours([real], differentiable=True)
    real.grad = torch.ones(2)
    with pytest.raises(ValueError, match="differentiable=True is not supported with the memory on"):
        opt.step()
    # with the memory off each is torch's optimizer (complex parameters included)
    twin = complex_param.detach().clone().requires_grad_()
    off, theirs = ours([complex_param], kappa=0), OURS[ours]([twin])
    for x, o in ((complex_param, off), (twin, theirs)):
        x.grad = torch.full((2,), 1 + 2j)
        o.step()
    assert torch.equal(complex_param, twin)


def test_the_readme_lists_every_deliberate_refusal_with_its_reason():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deliberate refusals", 1)[1].split("\n## ", 1)[0]
    for refusal in ("complex", "differentiable=True", "listed twice", "sparse"):
        assert refusal in section, refusal
