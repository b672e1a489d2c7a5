"""State layout, state_dict round trips, bit-identical resume, dtypes after load."""

import io
import warnings

import pytest
import torch
from streams import gradient_stream, make_params, set_grads

import hf_memopt

OPTS = {
    "adamw": (hf_memopt.MemoryAugmentedAdamW, dict(lr=1e-2)),
    "adamw-foreach": (hf_memopt.MemoryAugmentedAdamW, dict(lr=1e-2, foreach=True)),
    "adam": (hf_memopt.MemoryAugmentedAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "sgd": (hf_memopt.MemoryAugmentedSGD, dict(lr=1e-3, momentum=0.9)),
    "rmsprop": (hf_memopt.MemoryAugmentedRMSprop, dict(lr=1e-3, centered=True, momentum=0.1)),
}


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("buffer_dtype", [None, "bf16"])
def test_resume_is_bit_identical(name, buffer_dtype):
    cls, kwargs = OPTS[name]
    grads = list(gradient_stream(12))
    params = make_params()
    opt = cls(params, topc=3, decay=0.8, buffer_dtype=buffer_dtype, **kwargs)
    for g in grads[:6]:
        set_grads(params, g)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved = save_load(opt.state_dict())

    for g in grads[6:]:
        set_grads(params, g)
        opt.step()

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = cls(resumed, topc=3, decay=0.8, buffer_dtype=buffer_dtype, **kwargs)
    opt2.load_state_dict(saved)
    for g in grads[6:]:
        set_grads(resumed, g)
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    for p, q in zip(params, resumed):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            assert v.dtype == w.dtype and torch.equal(v, w), k


def test_state_layout():
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=4, buffer_dtype="bf16")
    assert all(len(opt.state[p]) == 0 for p in params), "state is created lazily in step()"
    for g in gradient_stream(2, skip_every=0):
        set_grads(params, g)
        opt.step()
    for p in params:
        st = opt.state[p]
        for i in range(4):
            assert st[f"memory_{i}"].shape == p.shape and st[f"memory_{i}"].dtype == torch.bfloat16
            assert st[f"priority_{i}"].dim() == 0 and st[f"priority_{i}"].dtype == torch.float32
        assert st["memory_sum"].shape == p.shape and st["memory_sum"].dtype == torch.float32
        assert st["memory_count"].dim() == 0 and int(st["memory_count"]) == 2
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in st.values())
    sd = save_load(opt.state_dict())  # weights_only=True loads it
    assert sd["param_groups"][0]["topc"] == 4


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_dtypes_survive_load(param_dtype):
    params = make_params(param_dtype)
    opt = hf_memopt.MemoryAugmentedAdamW(
        params, topc=2, buffer_dtype="bf16" if param_dtype == torch.float32 else "fp32"
    )
    for g in gradient_stream(3, param_dtype):
        set_grads(params, g)
        opt.step()
    sd = save_load(opt.state_dict())
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = hf_memopt.MemoryAugmentedAdamW(fresh, topc=2, buffer_dtype=opt.param_groups[0]["buffer_dtype"])
    opt2.load_state_dict(sd)
    for p, q in zip(params, fresh):
        a, b = opt.state[p], opt2.state[q]
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k  # fp32 priorities and sums are not rounded through bf16
        assert b["memory_0"].dtype == hf_memopt.MemoryConfig.from_group(opt.param_groups[0]).buffer_dtype
        assert b["priority_0"].dtype == torch.float32 and b["memory_sum"].dtype == torch.float32


def test_other_topc_is_a_clear_error():
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=3)
    for g in gradient_stream(2):
        set_grads(params, g)
        opt.step()
    sd = opt.state_dict()
    opt2 = hf_memopt.MemoryAugmentedAdamW([p.detach().clone().requires_grad_() for p in params], topc=5)
    sd["param_groups"][0]["topc"] = 5  # a user overriding the hyperparameter but not the memory
    with pytest.raises(ValueError, match="topc=3.*topc=5"):
        opt2.load_state_dict(sd)


def test_missing_memory_keys_start_empty_with_a_warning():
    params = make_params()
    plain = torch.optim.AdamW(params, lr=1e-2)
    for g in gradient_stream(2):
        set_grads(params, g)
        plain.step()
    sd = plain.state_dict()
    for group in sd["param_groups"]:
        group.update(topc=3, decay=0.7, kappa=1.0, aggregation="mean", key="group", buffer_dtype=None)
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt = hf_memopt.MemoryAugmentedAdamW(fresh, lr=1e-2, topc=3)
    with pytest.warns(UserWarning, match="no critical-gradient memory"):
        opt.load_state_dict(sd)
    for g in gradient_stream(1):
        set_grads(fresh, g)
        opt.step()
    assert int(opt.state[fresh[0]]["memory_count"]) == 1
    torch.testing.assert_close(opt.state[fresh[0]]["exp_avg"].shape, fresh[0].shape)


def test_loaded_state_is_not_shared_with_the_state_dict():
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=2)
    for g in gradient_stream(2):
        set_grads(params, g)
        opt.step()
    sd = opt.state_dict()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd["state"][0].items()}
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = hf_memopt.MemoryAugmentedAdamW(fresh, topc=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    for g in gradient_stream(3, seed=5):
        set_grads(fresh, g)
        opt2.step()
    for k in ("priority_0", "priority_1", "memory_count"):
        assert torch.equal(sd["state"][0][k], before[k]), k
