"""The plain Trainer with optim="memopt_*": param groups, schedulers, gradient
accumulation, clipping, bf16, steps skipped by the grad scaler, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from test_transformers_fixtures import (  # noqa: F401 (fixture)
    ClassificationData,
    inner_optimizer,
    memory_slots,
    one_torch_thread,
    tiny_bert,
    training_args,
)
from transformers import Trainer

import hf_memopt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Settings that exercise everything the Trainer does around the optimizer step.
BUSY = dict(
    gradient_accumulation_steps=2,
    per_device_train_batch_size=4,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    max_grad_norm=0.5,
    weight_decay=0.1,
)


CLASS_OF = {
    "memopt_adamw": hf_memopt.MemoryAugmentedAdamW,
    "memopt_adam": hf_memopt.MemoryAugmentedAdam,
    "memopt_sgd": hf_memopt.MemoryAugmentedSGD,
    "memopt_rmsprop": hf_memopt.MemoryAugmentedRMSprop,
    "memopt_adamw_cm": hf_memopt.CriticalMomentaAdamW,
}


def train(tmp_path, name: str, model=None, **overrides) -> Trainer:
    model = tiny_bert() if model is None else model
    trainer = Trainer(model=model, args=training_args(tmp_path / name, **overrides), train_dataset=ClassificationData())
    trainer.train()
    return trainer


def assert_same_params(a: Trainer, b: Trainer, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("memopt", "memopt_args", "reference"),
    [
        ("memopt_adamw", "", "adamw_torch"),  # through transformers' own flag
        ("memopt_adamw_cm", "", "adamw_torch"),  # Critical Momenta: kappa=0 is AdamW too
        # The others through Trainer(optimizer_cls_and_kwargs=...): how transformers reads
        # optim_args for its "sgd"/"rmsprop" differs between 5.x versions.
        ("memopt_sgd", "momentum=0.9,", (torch.optim.SGD, {"momentum": 0.9})),
        ("memopt_rmsprop", "alpha=0.9,", (torch.optim.RMSprop, {"alpha": 0.9})),
        ("memopt_adam", "amsgrad=true,", (torch.optim.Adam, {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": True})),
    ],
)
def test_kappa_zero_trains_exactly_like_the_torch_optimizer(tmp_path, memopt, memopt_args, reference):
    """Groups, weight decay, scheduler, accumulation and clipping all reach our optimizer as
    they reach torch's: with the memory off, the runs coincide."""
    ours = train(tmp_path, "ours", optim=memopt, optim_args=memopt_args + "kappa=0", **BUSY)
    if isinstance(reference, str):
        ref = train(tmp_path, "ref", optim=reference, **BUSY)
    else:
        cls, kwargs = reference
        args = training_args(tmp_path / "ref", **BUSY)
        ref = Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=ClassificationData(),
            optimizer_cls_and_kwargs=(cls, {"lr": args.learning_rate, **kwargs}),
        )
        ref.train()
    assert_same_params(ours, ref)

    optimizer = inner_optimizer(ours)
    assert type(optimizer) is CLASS_OF[memopt]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in ours.model.named_parameters()}
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(ours.model.parameters()))
    # The scheduler drives our param groups.
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(ours.lr_scheduler.get_last_lr())


def test_memory_changes_the_run(tmp_path):
    """Guard for the parity test: with kappa > 0 the same run ends elsewhere."""
    ours = train(tmp_path, "ours", optim="memopt_adamw", optim_args="topc=3", max_steps=3)
    ref = train(tmp_path, "ref", optim="adamw_torch", max_steps=3)
    diff = max((p - q).abs().max().item() for p, q in zip(ours.model.parameters(), ref.model.parameters()))
    assert diff > 1e-4


def test_gradient_accumulation_admits_once_per_update(tmp_path):
    trainer = train(tmp_path, "ga", optim="memopt_adamw", optim_args="topc=5", max_steps=3, **BUSY)
    optimizer = inner_optimizer(trainer)
    for p in trainer.model.parameters():
        state = optimizer.state[p]
        # 3 updates of 2 micro-batches each: 3 gradients stored (6 would mean per micro-batch).
        assert int(state["step"]) == 3
        assert int(state["memory_count"]) == 3


def _memory_norm(trainer: Trainer) -> tuple[float, list[torch.Tensor]]:
    optimizer = inner_optimizer(trainer)
    stored = [memory_slots(optimizer, p)[0].double() for p in trainer.model.parameters()]
    return torch.sqrt(sum((t * t).sum() for t in stored)).item(), stored


def test_memory_stores_clipped_gradients_unless_max_grad_norm_is_zero(tmp_path):
    common = dict(optim="memopt_adamw", optim_args="topc=1", max_steps=1)
    clipped = train(tmp_path, "clip", max_grad_norm=1e-3, **common)
    raw = train(tmp_path, "raw", max_grad_norm=0.0, **common)
    clipped_norm, clipped_slots = _memory_norm(clipped)
    raw_norm, raw_slots = _memory_norm(raw)
    assert raw_norm > 0.05  # the tiny model's first gradient, far above the clip
    assert clipped_norm == pytest.approx(1e-3, rel=1e-4)
    # Same first gradient in both runs: the clipped memory is the raw one scaled down.
    for c, r in zip(clipped_slots, raw_slots):
        torch.testing.assert_close(c, r * (1e-3 / raw_norm), rtol=1e-4, atol=1e-12)


def test_bf16_autocast_and_bf16_buffers(tmp_path):
    ours = train(tmp_path, "ours", optim="memopt_adamw", optim_args="topc=2,buffer_dtype=bf16", bf16=True)
    optimizer = inner_optimizer(ours)
    for p in ours.model.parameters():
        slots = memory_slots(optimizer, p)
        assert len(slots) == 2 and all(s.dtype == torch.bfloat16 for s in slots)
        assert optimizer.state[p]["priority_0"].dtype == torch.float32
        assert int(optimizer.state[p]["memory_count"]) == 2
    # Under bf16 autocast, memory off still equals AdamW.
    off = train(tmp_path, "off", optim="memopt_adamw", optim_args="kappa=0", bf16=True)
    ref = train(tmp_path, "ref", optim="adamw_torch", bf16=True)
    assert_same_params(off, ref)


@pytest.mark.parametrize("fused", [None, True])
def test_step_skipped_by_grad_scaler_leaves_memory_untouched(fused):
    """What the Trainer's fp16 path does (accelerate's AcceleratedOptimizer around the
    optimizer, with a GradScaler): an overflowing step never reaches the memory."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator state
    model = tiny_bert()
    optimizer = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-2, topc=3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    batch = next(iter(torch.utils.data.DataLoader(ClassificationData(), batch_size=8)))

    def step(overflow: bool) -> None:
        wrapped.zero_grad()
        scaler.scale(model(**batch).loss).backward()
        if overflow:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)  # as accelerator.clip_grad_norm_ does before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        wrapped.step()

    step(overflow=False)
    assert not wrapped.step_was_skipped
    before_state = copy.deepcopy(optimizer.state_dict())
    before_params = [p.detach().clone() for p in model.parameters()]
    stats_before = optimizer.memory_stats()
    assert stats_before["admissions"] > 0

    step(overflow=True)
    assert wrapped.step_was_skipped
    after_state = optimizer.state_dict()
    for pid, state in before_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after_state["state"][pid][key], value), key
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params))
    stats = optimizer.memory_stats()
    assert stats["admissions"] == 0 and stats["rejections"] == 0

    step(overflow=False)
    assert not wrapped.step_was_skipped
    assert all(int(optimizer.state[p]["memory_count"]) == 2 for p in model.parameters())


@pytest.mark.parametrize(
    ("optim", "dtype", "optim_args"),
    [
        ("memopt_adamw", torch.float32, "topc=3,buffer_dtype=bf16"),
        ("memopt_adamw", torch.bfloat16, "topc=3,decay=0.9"),
        ("memopt_adamw_cm", torch.float32, "topc=3,buffer_dtype=bf16"),  # Critical Momenta, the C kernel
        ("memopt_adamw_cm", torch.bfloat16, "topc=2"),  # Critical Momenta, the torch executor
    ],
)
def test_resume_from_checkpoint_continues_exactly(tmp_path, optim, dtype, optim_args):
    common = dict(optim=optim, optim_args=optim_args, max_steps=6, save_strategy="steps", save_steps=3)
    straight = train(tmp_path, "straight", model=tiny_bert().to(dtype), **common)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = Trainer(
        model=tiny_bert().to(dtype),
        args=training_args(tmp_path / "resumed", **common),
        train_dataset=ClassificationData(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert_same_params(straight, resumed, rtol=0, atol=0)
    a, b = inner_optimizer(straight), inner_optimizer(resumed)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype, key
                assert torch.equal(sa[key], sb[key]), key
        expected = torch.bfloat16  # bf16 buffers, or the bf16 parameters' dtype
        assert all(s.dtype == expected for s in memory_slots(b, q))
