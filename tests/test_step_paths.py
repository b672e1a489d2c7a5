"""The CPU step paths stay exact when the optimizer's layout changes under them.

The whole-step kernel keeps per-group kernel columns between steps; these tests change what those
columns point at (a load into the same optimizer, a swapped parameter storage, several param groups
with different hyperparameters) and compare against runs that cannot be affected: an uninterrupted
copy, a run without the change, and the slow reference of each group on its own.
"""

import copy

import pytest
import torch
from reference import ReferenceOptimizer
from streams import clone_params, gradient_stream, make_params, set_grads

import hf_memopt


def _steps(opt, params, grads_list):
    for grads in grads_list:
        set_grads(params, grads)
        opt.step()


def _memory_snapshot(opt, params):
    out = []
    for p in params:
        st = opt.state[p]
        out.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()})
    return out


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16])
def test_load_into_the_same_optimizer_mid_run(buffer_dtype):
    stream = list(gradient_stream(14))
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=3, decay=0.8, buffer_dtype=buffer_dtype)
    _steps(opt, params, stream[:8])
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _steps(opt, params, stream[8:])
    expected_params = [p.detach().clone() for p in params]
    expected_state = _memory_snapshot(opt, params)

    with torch.no_grad():
        for p, q in zip(params, saved_params):
            p.copy_(q)
    opt.load_state_dict(saved)
    _steps(opt, params, stream[8:])
    for p, q in zip(params, expected_params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    _assert_same(_memory_snapshot(opt, params), expected_state)


def test_swapped_parameter_storage():
    stream = list(gradient_stream(10, skip_every=0))
    params, other = make_params(), make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=2)
    ref = hf_memopt.MemoryAugmentedAdamW(other, lr=1e-2, topc=2)
    for t, grads in enumerate(stream):
        if t == 5:
            for p in params:
                p.data = p.data.clone()  # new storage, same Parameter object
        set_grads(params, grads)
        set_grads(other, grads)
        opt.step()
        ref.step()
    for p, q in zip(params, other):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


GROUPS = [
    dict(topc=2, decay=0.5, kappa=2.0, aggregation="sum", key="group", buffer_dtype=None),
    dict(topc=3, decay=0.9, kappa=1.0, aggregation="mean", key="group", buffer_dtype=torch.bfloat16),
    dict(topc=1, decay=0.99, kappa=0.5, aggregation="mid", key="tensor", buffer_dtype=None),
]


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedAdam"])
def test_param_groups_with_their_own_memory_match_separate_references(name):
    """Groups are independent: one optimizer over three groups equals the reference of each group alone."""
    params = make_params() + make_params(seed=1) + make_params(seed=2)
    n = len(params) // 3
    split = [params[i * n : (i + 1) * n] for i in range(3)]
    base = dict(lr=1e-2, weight_decay=0.1)
    opt = getattr(hf_memopt, name)([{"params": ps, **mem} for ps, mem in zip(split, GROUPS)], **base)
    refs, ref_params = [], []
    for ps, mem in zip(split, GROUPS):
        rp = clone_params(ps)
        ref_params.append(rp)
        refs.append(ReferenceOptimizer(name, rp, **mem, **base))
    streams = [list(gradient_stream(12, seed=10 + i)) for i in range(3)]
    for t in range(12):
        for i in range(3):
            set_grads(split[i], streams[i][t])
            set_grads(ref_params[i], streams[i][t])
            refs[i].step()
        opt.step()
    for i in range(3):
        for p, q in zip(split[i], ref_params[i]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for j, p in enumerate(split[i]):
            stored = refs[i].stored(j)
            assert int(opt.state[p]["memory_count"]) == len(stored)
            for s, (value, _priority) in enumerate(stored):
                torch.testing.assert_close(opt.state[p][f"memory_{s}"], value, rtol=0, atol=0)
