"""What a user changes, copies or compiles behaves as torch's optimizers do (issue 22, items 1-3, 5, 7).

Each test holds the optimizer to an independent expectation: torch's own optimizer, the slow SPEC
reference (``tests/reference.py``), a fresh optimizer loaded with ``without_memory``, or the same
optimizer run eagerly.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from reference import ReferenceOptimizer
from reference_cm import ReferenceCriticalMomenta
from streams import clone_params, gradient_stream, make_params, set_grads

import hf_memopt

CLASSES = {
    "MemoryAugmentedAdamW": dict(lr=1e-2),
    "MemoryAugmentedAdam": dict(lr=1e-2, weight_decay=0.1),
    "MemoryAugmentedSGD": dict(lr=1e-2, momentum=0.9),
    "MemoryAugmentedRMSprop": dict(lr=1e-3, centered=True),
    "CriticalMomentaAdamW": dict(lr=1e-2),
}


def build(name, params, **kwargs):
    return getattr(hf_memopt, name)(params, **{**CLASSES[name], **kwargs})


def run(opt, params, grads):
    for g in grads:
        set_grads(params, g)
        opt.step()


# -- 1. memory settings edited in param_groups ------------------------------------------------------


@pytest.mark.parametrize("executor", ["torch", "auto"])
@pytest.mark.parametrize(("key", "old", "new"), [("topc", 2, 4), ("topc", 2, 1), ("buffer_dtype", None, "bfloat16")])
def test_an_edited_topc_or_buffer_dtype_starts_the_memory_as_without_memory_would(executor, key, old, new):
    """The edit takes effect at the next step exactly as a fresh optimizer with the new setting, loaded with
    ``without_memory`` at that point, would run; with a warning naming the key."""
    grads = list(gradient_stream(10))
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, executor=executor, **{"topc": 2, key: old})
    run(opt, params, grads[:4])

    twin = clone_params(params)
    fresh = hf_memopt.MemoryAugmentedAdamW(twin, lr=1e-2, executor=executor, **{"topc": 2, key: new})
    with pytest.warns(UserWarning, match="no critical-gradient memory"):
        # a copy: torch's load_state_dict keeps the checkpoint's tensors (shared with ``opt`` here)
        fresh.load_state_dict(copy.deepcopy(hf_memopt.without_memory(opt.state_dict())))

    opt.param_groups[0][key] = new
    with pytest.warns(UserWarning, match=rf"param group 0: {key} .* starts empty"):
        set_grads(params, grads[4])
        opt.step()
    set_grads(twin, grads[4])
    fresh.step()
    run(opt, params, grads[5:])
    run(fresh, twin, grads[5:])
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == fresh.state[q].keys()
        for k, v in fresh.state[q].items():
            assert v.dtype == opt.state[p][k].dtype and torch.equal(v, opt.state[p][k]), k


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda g: g.pop("decay"), "param group 1 has no decay"),
        (lambda g: g.update(decay=1.5), "param group 1: decay must be"),
        (lambda g: g.update(topc=0), "param group 1: topc must be"),
        (lambda g: g.update(buffer_dtype="int8"), "param group 1: buffer_dtype must be"),
        (lambda g: g.update(aggregation="max"), "param group 1: aggregation must be"),
    ],
)
def test_a_bad_edit_is_a_value_error_naming_the_group_and_key_and_changes_nothing(edit, match):
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, topc=2)
    grads = list(gradient_stream(3))
    run(opt, params, grads[:2])
    before = copy.deepcopy(opt.state_dict())
    kept = [p.detach().clone() for p in params]
    edit(opt.param_groups[1])
    set_grads(params, grads[2])
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, kept))
    after = opt.state_dict()
    for pid, state in before["state"].items():
        for k, v in state.items():
            assert torch.equal(after["state"][pid][k], v), k


# -- 2. copies and pickles ------------------------------------------------------------------------


def _pickled(opt):
    return pickle.loads(pickle.dumps(opt))


def _torch_saved(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("executor", ["torch", "auto"])
@pytest.mark.parametrize("how", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_steps_exactly_as_the_original(name, executor, how):
    grads = list(gradient_stream(10))
    params = make_params()
    opt = build(name, params, topc=3, decay=0.8, executor=executor, save_memory=False)
    run(opt, params, grads[:5])
    twin = how(opt)
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(twin) if not k.startswith("_")}
    assert (twin.executor, twin.save_memory) == (executor, False)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    run(opt, params, grads[5:])
    run(twin, twin_params, grads[5:])
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, twin.state[q][k]), k
    # the copy keeps save_memory=False and its checkpoint hooks
    assert not any("memory_0" in s for s in twin.state_dict()["state"].values())
    assert twin.memory_stats()["fill"] == opt.memory_stats()["fill"]


def test_a_copy_of_a_segmented_optimizer_keeps_its_segments():
    params = [torch.zeros(12, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=2, key="tensor", executor="torch")
    opt.bind_segments(params[0], [(0, 4), (4, 8)])
    twin = copy.deepcopy(opt)
    stream = list(gradient_stream(6, shapes=[(12,), (5,)]))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    run(opt, params, stream)
    run(twin, twin_params, stream)
    assert opt.state[params[0]]["priority_0"].shape == twin.state[twin_params[0]]["priority_0"].shape == (2,)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


# -- 3. float64 parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "CriticalMomentaAdamW"])
@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_float64_parameters_follow_the_reference(name, buffer_dtype):
    grads = list(gradient_stream(8, dtype=torch.float64))
    params = make_params(torch.float64)
    ref_params = clone_params(params)
    memory = dict(topc=2, decay=0.8, kappa=1.0, aggregation="mean", key="tensor")
    opt = build(name, params, executor="torch", buffer_dtype=buffer_dtype, **memory)
    ref = ReferenceOptimizer(name, ref_params, buffer_dtype=buffer_dtype, **memory, **CLASSES[name])
    for g in grads:
        set_grads(params, g)
        set_grads(ref_params, g)
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            # S is kept in fp32 (SPEC section 2): the aggregate agrees to fp32's precision
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            stored = ref.stored(i)
            assert int(opt.state[p]["memory_count"]) == len(stored)
            for j, (value, _priority) in enumerate(stored):
                assert opt.state[p][f"memory_{j}"].dtype == value.dtype
                assert torch.equal(opt.state[p][f"memory_{j}"], value)


@pytest.mark.parametrize("buffer_dtype", [None, torch.bfloat16, torch.float32])
def test_float64_critical_momenta_follows_the_reference(buffer_dtype):
    grads = list(gradient_stream(8, dtype=torch.float64, skip_every=0))
    params = make_params(torch.float64)
    ref_params = clone_params(params)
    memory = dict(topc=2, decay=0.8, kappa=1.0, key="tensor", buffer_dtype=buffer_dtype)
    opt = hf_memopt.CriticalMomentaAdamW(params, lr=1e-2, executor="torch", **memory)
    ref = ReferenceCriticalMomenta(ref_params, lr=1e-2, **memory)
    for g in grads:
        set_grads(params, g)
        set_grads(ref_params, g)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_step_that_raises_changes_nothing():
    """A refused group (complex parameters with the memory on) is found before any group's state is touched."""
    real = torch.zeros(3, requires_grad=True)
    cplx = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    opt = hf_memopt.CriticalMomentaAdamW([{"params": [real]}, {"params": [cplx]}], lr=1e-2, executor="torch")
    real.grad, cplx.grad = torch.ones(3), torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="param group 1: complex parameters are not supported"):
        opt.step()
    assert torch.equal(real, torch.zeros(3)) and len(opt.state) == 0


# -- 5. torch.compile of a training step -------------------------------------------------------------


def _train(cls_name, executor, backend, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = getattr(hf_memopt, cls_name)(model.parameters(), lr=1e-2, topc=2, executor=executor)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def train_step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    fn = torch.compile(train_step, backend=backend) if backend else train_step
    for _ in range(steps):
        fn()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize(
    ("name", "executor"),
    [
        ("MemoryAugmentedSGD", "torch"),
        ("MemoryAugmentedRMSprop", "torch"),
        ("MemoryAugmentedAdamW", "torch"),
        ("MemoryAugmentedAdamW", "auto"),
        ("CriticalMomentaAdamW", "torch"),
    ],
)
def test_a_compiled_training_step_steps_as_the_eager_one(name, executor):
    torch._dynamo.reset()
    eager, _ = _train(name, executor, None)
    compiled, opt = _train(name, executor, "eager")
    assert opt.memory_stats()["admissions"] > 0
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # inductor compiles C++ for the forward and backward: 10-40 s here
def test_a_training_step_compiled_by_inductor_on_cpu():
    torch._dynamo.reset()
    eager, _ = _train("MemoryAugmentedSGD", "torch", None, steps=2)
    compiled, opt = _train("MemoryAugmentedSGD", "torch", "inductor", steps=2)
    assert opt.memory_stats()["admissions"] > 0
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)  # inductor may fuse the forward differently


# -- 7. numpy scalars, lookups, estimates, sparse gradients ------------------------------------------


def test_numpy_scalars_are_numbers():
    p = torch.zeros(3, requires_grad=True)
    opt = hf_memopt.MemoryAugmentedAdamW([p], topc=np.int64(5), decay=np.float32(0.5), kappa=np.float64(2))
    group = opt.param_groups[0]
    assert (group["topc"], group["decay"], group["kappa"]) == (5, 0.5, 2.0)
    assert type(group["topc"]) is int and type(group["decay"]) is float  # state dicts stay weights_only-loadable
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "topc": np.int32(3)})
    assert opt.param_groups[1]["topc"] == 3
    assert hf_memopt.estimate_memory(np.int64(1000), topc=np.int64(2))["memopt"] == 1000 * (8 + 2 * 4 + 4)


def test_executor_for_a_copy_of_a_group_says_what_to_pass():
    p = torch.zeros(3, requires_grad=True)
    opt = hf_memopt.MemoryAugmentedAdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    assert opt.executor_for(opt.param_groups[0]) == opt.executor_for(0) is not None
    with pytest.raises(ValueError, match="not one of optimizer.param_groups"):
        opt.executor_for(dict(opt.param_groups[0]))
    with pytest.raises(IndexError, match="out of range"):
        opt.executor_for(3)


def test_estimate_memory_refuses_a_negative_count():
    with pytest.raises(ValueError, match="model_or_numel"):
        hf_memopt.estimate_memory(-5, topc=5)


def test_sgd_with_the_memory_off_takes_sparse_gradients_as_torch():
    weight = torch.randn(6, 3, requires_grad=True)
    twin = weight.detach().clone().requires_grad_()
    ours = hf_memopt.MemoryAugmentedSGD([weight], lr=0.1, kappa=0)
    theirs = torch.optim.SGD([twin], lr=0.1)
    for rows in ([0, 2], [2, 5]):
        for w, opt in ((weight, ours), (twin, theirs)):
            w.grad = torch.sparse_coo_tensor([rows], torch.ones(2, 3), (6, 3), check_invariants=True)
            opt.step()
    assert torch.equal(weight, twin)
    on = hf_memopt.MemoryAugmentedSGD([weight], lr=0.1)
    weight.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 3), (6, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse gradients are not supported with the memory on"):
        on.step()


# -- memory_stats: reading is side-effect free for other readers -------------------------------------


def test_reading_memory_stats_takes_no_counts_from_another_reader():
    p = torch.zeros(4, requires_grad=True)
    opt = hf_memopt.MemoryAugmentedAdamW([p], lr=0.0, topc=2, decay=1.0)
    for g in (1.0, 2.0, 3.0):
        p.grad = torch.full((4,), g)
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.memory_stats()["admissions"] == 3  # a user's debugging call
    p.grad = torch.full((4,), 0.5)
    opt.step()
    trainer = opt.memory_stats(reader="MemOptTrainer")
    assert (trainer["admissions"], trainer["rejections"]) == (3, 1)  # all four steps
    assert opt.memory_stats()["rejections"] == 1  # the user's reader: since its own last call
