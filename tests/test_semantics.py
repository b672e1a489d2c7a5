"""Edge cases of SPEC section 1 and of the torch.optim contract, against hand-derived expectations."""

import pytest
import torch

import hf_memopt

ALL = [
    hf_memopt.MemoryAugmentedAdamW,
    hf_memopt.MemoryAugmentedAdam,
    hf_memopt.MemoryAugmentedSGD,
    hf_memopt.MemoryAugmentedRMSprop,
]


def stored_values(opt, p):
    st = opt.state[p]
    return [st[f"memory_{i}"].clone() for i in range(int(st["memory_count"]))]


def test_aggregate_uses_the_memory_as_it_stood():
    """SGD lr=1, sum aggregation: the update is exactly -(g + kappa*S/n) with S before admission."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = hf_memopt.MemoryAugmentedSGD([p], lr=1.0, topc=2, decay=1.0, kappa=0.5, aggregation="sum")
    g1, g2, g3 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    expected = torch.zeros(2)
    for g, agg in [(g1, g1), (g2, g2 + 0.5 * g1), (g3, g3 + 0.5 * (g1 + g2) / 2)]:
        p.grad = g
        opt.step()
        expected -= agg
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize(
    "aggregation,expected", [("mean", (3 + 2 * 5) / (1 + 2 * 2)), ("sum", 3 + 2 * 5 / 2), ("mid", (3 + 2 * 5 / 2) / 3)]
)
def test_aggregation_formulas(aggregation, expected):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = hf_memopt.MemoryAugmentedSGD([p], lr=1.0, topc=4, decay=1.0, kappa=2.0, aggregation=aggregation)
    for g in (2.0, 3.0):  # stored: 2 and 3 (S = 5, n = 2)
        p.grad = torch.tensor([g])
        opt.step()
    before = p.detach().clone()
    p.grad = torch.tensor([3.0])
    opt.step()
    torch.testing.assert_close(before - p.detach(), torch.tensor([expected]))


def test_group_key_is_the_sum_of_norms():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = hf_memopt.MemoryAugmentedAdamW([p, q], lr=0.0, topc=2, decay=1.0, key="group")
    p.grad, q.grad = torch.tensor([3.0, 4.0]), torch.tensor([-2.0])
    opt.step()
    assert opt.state[p]["priority_0"].item() == 7.0 == opt.state[q]["priority_0"].item()


def test_per_group_hyperparameters_and_empty_groups():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = hf_memopt.MemoryAugmentedAdamW(
        [{"params": [a], "topc": 2, "buffer_dtype": "bf16"}, {"params": [b], "kappa": 0.0}, {"params": []}], topc=4
    )
    c = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [c], "decay": 0.5})
    for _ in range(3):
        a.grad, b.grad, c.grad = torch.ones(3), torch.ones(3), torch.ones(2)
        opt.step()
    assert opt.state[a]["memory_0"].dtype == torch.bfloat16 and "memory_1" in opt.state[a]
    assert "memory_2" not in opt.state[a]
    assert "memory_sum" not in opt.state[b]
    assert "memory_3" in opt.state[c]
    with pytest.raises(ValueError, match="decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "decay": 2.0})


def test_closure_and_zero_grad():
    model = torch.nn.Linear(3, 1)
    opt = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-2, topc=2)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < losses[0]
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topc=0), "topc must be an int >= 1"),
        (dict(topc=2.5), "topc must be an int >= 1"),
        (dict(topc=True), "topc"),
        (dict(decay=0.0), r"decay must be a number with 0 < decay <= 1"),
        (dict(decay=1.01), "decay"),
        (dict(kappa=-0.1), "kappa must be a finite number >= 0"),
        (dict(kappa=float("nan")), "kappa"),
        (dict(kappa=float("inf")), "kappa"),
        (dict(aggregation="median"), "aggregation must be one of 'mean', 'sum', 'mid'"),
        (dict(key="layer"), "key must be one of 'group', 'tensor'"),
        (dict(buffer_dtype="int8"), "buffer_dtype must be"),
        (dict(buffer_dtype=torch.float64), "buffer_dtype must be"),
    ],
)
@pytest.mark.parametrize("cls", ALL)
def test_bad_input_names_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)


@pytest.mark.parametrize("cls", ALL)
def test_sparse_gradients_are_refused(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_capturable_with_memory_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = hf_memopt.MemoryAugmentedAdamW([p], differentiable=True)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        opt.step()


def test_buffer_dtype_strings():
    for name, dtype in [("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32), (None, None)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = hf_memopt.MemoryAugmentedAdamW([p], buffer_dtype=name)
        # stored by name in the param group: state dicts (DCP's too) take strings, not torch.dtype
        assert opt.param_groups[0]["buffer_dtype"] == (None if dtype is None else str(dtype).removeprefix("torch."))
        p.grad = torch.ones(1)
        opt.step()
        assert opt.state[p]["memory_0"].dtype == (dtype or torch.float32)


def test_memory_stats():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = hf_memopt.MemoryAugmentedAdamW([p], lr=0.0, topc=4, decay=1.0, key="tensor", buffer_dtype="bf16")
    for g in (1.0, 2.0, 3.0, 4.0, 0.5, 5.0):
        p.grad = torch.full((10,), g)
        opt.step()
    stats = opt.memory_stats()
    assert stats["admissions"] == 5 and stats["rejections"] == 1
    assert stats["fill"] == 1.0
    # stored at clocks 6 (5.0, replaced 1.0), 2, 3, 4 -> ages 0, 4, 3, 2
    assert stats["mean_age"] == pytest.approx((0 + 4 + 3 + 2) / 4)
    assert stats["memory_bytes"] == 4 * 10 * 2 + 10 * 4
    assert stats["state_bytes"] == stats["memory_bytes"] + 2 * 10 * 4
    assert opt.memory_stats()["admissions"] == 0  # counters restart after each call


def test_capturable_message_names_the_flag():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = hf_memopt.MemoryAugmentedAdamW([p], differentiable=True)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="or differentiable=False"):
        opt.step()
