"""Resuming a Trainer run with another --optim: from torch's AdamW to memopt_adamw mid-training."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_transformers_fixtures import (  # noqa: F401 (fixture)
    ClassificationData,
    inner_optimizer,
    one_torch_thread,
    tiny_bert,
    training_args,
)
from transformers import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resume_an_adamw_checkpoint_with_memopt_adamw(tmp_path):
    """The base state (moments, steps) carries over and the memory starts empty, so the first step after
    the switch is exactly AdamW's next step; then training goes on with the memory."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=3)
    straight = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path / "adamw", optim="adamw_torch", **common),
        train_dataset=ClassificationData(),
    )
    straight.train()
    checkpoint = tmp_path / "adamw" / "checkpoint-3"
    switched = Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path / "memopt", optim="memopt_adamw", optim_args="topc=2", **common),
        train_dataset=ClassificationData(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        switched.train(resume_from_checkpoint=str(checkpoint))
    assert sum("no critical-gradient memory" in str(w.message) for w in caught) == 1
    for (name, p), q in zip(straight.model.named_parameters(), switched.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    opt = inner_optimizer(switched)
    assert type(opt).__name__ == "MemoryAugmentedAdamW"
    assert all(int(opt.state[p]["memory_count"]) == 1 for p in switched.model.parameters() if p.requires_grad)
