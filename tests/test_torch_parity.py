"""kappa=0 is exactly the torch counterpart, for every implementation flag torch has."""

import pytest
import torch
from streams import clone_params, gradient_stream, make_params, set_grads

import hf_memopt

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


@pytest.mark.parametrize("name,torch_cls,kwargs", CASES)
@pytest.mark.parametrize("flag", list(FLAGS))
def test_kappa_zero_equals_torch(name, torch_cls, kwargs, flag):
    if flag == "fused" and torch_cls is torch.optim.RMSprop:
        pytest.skip("torch has no fused RMSprop")
    params = make_params()
    ref_params = clone_params(params)
    opt = getattr(hf_memopt, name)(params, kappa=0.0, **kwargs, **FLAGS[flag])
    ref = torch_cls(ref_params, **kwargs, **FLAGS[flag])
    for grads in gradient_stream(10):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    for p in params:
        assert not any(k.startswith(("memory_", "priority_")) for k in opt.state[p]), "kappa=0 allocates no memory"


def test_is_a_torch_optimizer_with_torch_defaults():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = hf_memopt.MemoryAugmentedAdamW(p)
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.Optimizer)
    for k, v in ref.defaults.items():
        assert opt.defaults[k] == v, k
    assert opt.defaults["topc"] == 10 and opt.defaults["decay"] == 0.7 and opt.defaults["kappa"] == 1.0
    assert opt.defaults["aggregation"] == "mean" and opt.defaults["key"] == "group"
    assert hf_memopt.MemoryAugmentedSGD(p).defaults["aggregation"] == "sum"
