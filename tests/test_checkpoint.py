"""State layout, state_dict round trips, bit-identical resume, dtypes after load."""

import io
import warnings

import pytest
import torch
from executors_available import require_or_skip
from streams import gradient_stream, make_params, set_grads

import hf_memopt

OPTS = {
    "adamw": (hf_memopt.MemoryAugmentedAdamW, dict(lr=1e-2)),
    "adamw-foreach": (hf_memopt.MemoryAugmentedAdamW, dict(lr=1e-2, foreach=True)),
    "adam": (hf_memopt.MemoryAugmentedAdam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "sgd": (hf_memopt.MemoryAugmentedSGD, dict(lr=1e-3, momentum=0.9)),
    "rmsprop": (hf_memopt.MemoryAugmentedRMSprop, dict(lr=1e-3, centered=True, momentum=0.1)),
    "cm": (hf_memopt.CriticalMomentaAdamW, dict(lr=1e-2, amsgrad=True)),  # "auto": the C kernel's CM loop
    "cm-torch": (hf_memopt.CriticalMomentaAdamW, dict(lr=1e-2, executor="torch")),
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


def test_a_checkpoint_with_another_topc_is_refused_and_changes_nothing():
    """A topc=4 memory loaded into a topc=2 optimizer: ValueError naming topc and both values, and the
    optimizer keeps its own settings and state (it used to take topc=4 silently and train on)."""
    params = make_params()
    saver = hf_memopt.MemoryAugmentedAdamW(params, topc=4)
    for g in gradient_stream(3):
        set_grads(params, g)
        saver.step()
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt = hf_memopt.MemoryAugmentedAdamW(fresh, topc=2)
    for g in gradient_stream(1):
        set_grads(fresh, g)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[fresh[0]].items()}
    with pytest.raises(ValueError, match=r"param group 0 has topc=4, but this optimizer's has topc=2"):
        opt.load_state_dict(saver.state_dict())
    assert opt.param_groups[0]["topc"] == 2
    for k, v in before.items():
        assert torch.equal(opt.state[fresh[0]][k], v), k
    # the way out the message names: load without the memory, start an empty one of the new size
    with pytest.warns(UserWarning, match="no critical-gradient memory"):
        opt.load_state_dict(hf_memopt.without_memory(saver.state_dict()))
    assert opt.param_groups[0]["topc"] == 2


PAIRS = [
    (torch.optim.AdamW, hf_memopt.MemoryAugmentedAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (torch.optim.Adam, hf_memopt.MemoryAugmentedAdam, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.SGD, hf_memopt.MemoryAugmentedSGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (torch.optim.RMSprop, hf_memopt.MemoryAugmentedRMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
]


@pytest.mark.parametrize("torch_cls,cls,kwargs", PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_plain_torch_checkpoint_continues_with_an_empty_memory(torch_cls, cls, kwargs):
    """Switching from torch's optimizer mid-training: the base state carries over, the memory starts empty
    (one warning) with the new optimizer's own settings. With an empty memory the first step is the base
    optimizer's own step, so it must equal torch's next step from the same state."""
    stream = list(gradient_stream(5, skip_every=0))
    params = make_params()
    plain = torch_cls(params, **kwargs)
    for g in stream[:4]:
        set_grads(params, g)
        plain.step()
    saved = save_load(plain.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in params]
    set_grads(params, stream[4])
    plain.step()

    opt = cls(resumed, topc=3, decay=0.9, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved)
    memory_warnings = [w for w in caught if "no critical-gradient memory" in str(w.message)]
    assert len(memory_warnings) == 1
    group = opt.param_groups[0]
    assert (group["topc"], group["decay"]) == (3, 0.9)
    set_grads(resumed, stream[4])
    opt.step()
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert all(int(opt.state[q]["memory_count"]) == 1 for q in resumed)


def test_save_memory_false_writes_the_base_checkpoint_only():
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=4, save_memory=False)
    for g in gradient_stream(3):
        set_grads(params, g)
        opt.step()
    sd = save_load(opt.state_dict())
    assert all(not any(hf_memopt.engine.state.is_memory_key(k) for k in s) for s in sd["state"].values())
    assert "topc" not in sd["param_groups"][0]
    assert opt.state[params[0]]["memory_count"] > 0  # the running optimizer keeps its memory
    torch.optim.AdamW([p.detach().clone() for p in params]).load_state_dict(sd)  # torch reads it as its own
    fresh = [p.detach().clone().requires_grad_() for p in params]
    opt2 = hf_memopt.MemoryAugmentedAdamW(fresh, topc=4)
    with pytest.warns(UserWarning, match="no critical-gradient memory"):
        opt2.load_state_dict(sd)
    for a, b in zip(params, fresh):
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
    with pytest.raises(ValueError, match="save_memory must be True or False"):
        hf_memopt.MemoryAugmentedAdamW(params, save_memory="no")


@pytest.mark.parametrize(
    "first,second",
    [
        ("cpu", "torch"),
        ("torch", "cpu"),
        ("torch", "triton"),
        ("triton", "torch"),
        ("cpu", "triton"),
        ("triton", "cpu"),
    ],
)
def test_a_checkpoint_continues_on_another_executor(first, second):
    """Written under one executor, resumed under another: the same decisions and memory as a run that
    never left the first executor (priorities bit for bit: the same fp64 norms rounded to fp32). "triton"
    runs here under Triton's interpreter: CPU to the GPU engine and back."""
    for executor in {first, second} - {"torch"}:
        require_or_skip(executor)
    grads = list(gradient_stream(14))
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, topc=3, decay=0.8, buffer_dtype="bf16", executor=first)
    for g in grads[:7]:
        set_grads(params, g)
        opt.step()
    saved = save_load(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    for g in grads[7:]:
        set_grads(params, g)
        opt.step()
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = hf_memopt.MemoryAugmentedAdamW(resumed, topc=3, decay=0.8, buffer_dtype="bf16", executor=second)
    opt2.load_state_dict(saved)
    for g in grads[7:]:
        set_grads(resumed, g)
        opt2.step()
    assert opt2.executor_for(0) == second
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for k, v in opt.state[p].items():
            if k.startswith(("memory_", "priority_", "stored_at_")) and k != "memory_sum":
                assert torch.equal(v, opt2.state[q][k]), k
        torch.testing.assert_close(opt2.state[q]["memory_sum"], opt.state[p]["memory_sum"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["MemoryAugmentedAdamW", "MemoryAugmentedSGD"])
def test_a_checkpoint_written_by_the_previous_release_continues(name):
    """``tests/data/checkpoint_dc1e69c.pt`` was written by the code of main at dc1e69c (before the engine
    and executors): its state dict after 6 steps and its own parameters after 6 more. Loaded here, the
    same 6 steps give the same parameters: bit for bit on the "cpu" executor (the same kernel), to the
    rounding of one fused multiply-add on the "torch" executor (the old eager path computed g*cg + S*cs
    with an FMA, the multi-tensor path rounds the two products as the kernel does)."""
    from pathlib import Path

    saved = torch.load(Path(__file__).with_name("data") / "checkpoint_dc1e69c.pt", weights_only=True)[name]
    params = [p.clone().requires_grad_() for p in saved["params_at_6"]]
    opt = getattr(hf_memopt, name)(params, topc=3, decay=0.8, **saved["kwargs"])
    opt.load_state_dict(saved["state_dict"])
    for g in list(gradient_stream(12))[6:]:
        set_grads(params, g)
        opt.step()
    for p, q in zip(params, saved["params_at_12"]):
        if opt.executor_for(0) == "cpu":
            assert torch.equal(p.detach(), q)
        else:
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-6)
