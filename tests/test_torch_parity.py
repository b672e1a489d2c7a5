"""kappa=0 is exactly the torch counterpart, for every implementation flag torch has."""

import torch

import hf_memopt


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
