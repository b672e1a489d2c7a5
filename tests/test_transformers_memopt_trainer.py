"""MemOptTrainer: memory statistics in the logs, the model card's optimizer section."""

from __future__ import annotations

import re

import pytest
import yaml
from test_transformers_fixtures import ClassificationData, inner_optimizer, one_torch_thread, tiny_bert, training_args  # noqa: F401 (fixture)
from transformers import Trainer

from hf_memopt.integrations.model_card import executors
from hf_memopt.trainer import LOG_PREFIX, MemOptTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(tmp_path, **overrides) -> MemOptTrainer:
    return MemOptTrainer(
        model=tiny_bert(), args=training_args(tmp_path, **overrides), train_dataset=ClassificationData()
    )


def card_of(tmp_path) -> tuple[dict, str]:
    text = (tmp_path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_memory_stats_are_logged_with_the_loss(tmp_path):
    trainer = make(tmp_path, optim="memopt_adamw", optim_args="topc=3", max_steps=4, logging_steps=2)
    trainer.train()
    n_tensors = len(list(trainer.model.parameters()))
    numel = sum(p.numel() for p in trainer.model.parameters())
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    first, second = train_logs
    # Steps 1-2: every tensor admits (fewer than topc stored); ages 1 and 0 -> mean 0.5.
    assert first[LOG_PREFIX + "admissions"] == 2 * n_tensors
    assert first[LOG_PREFIX + "rejections"] == 0
    assert first[LOG_PREFIX + "admission_rate"] == 1.0
    assert first[LOG_PREFIX + "fill"] == pytest.approx(2 / 3)
    assert first[LOG_PREFIX + "mean_age"] == pytest.approx(0.5)
    # fp32 slots plus the fp32 running sum, per element.
    assert first[LOG_PREFIX + "memory_bytes"] == (3 + 1) * 4 * numel
    # Steps 3-4 are counted since the previous log only.
    assert second[LOG_PREFIX + "admissions"] + second[LOG_PREFIX + "rejections"] == 2 * n_tensors
    assert second[LOG_PREFIX + "fill"] == 1.0
    # only numbers reach the loggers; the executor's name is in memory_stats() and the card
    assert all(isinstance(v, (int, float)) for entry in train_logs for v in entry.values())
    assert LOG_PREFIX + "executor" not in first
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary and not any(k.startswith(LOG_PREFIX) for k in summary)


def test_model_card_has_tags_hyperparameters_bytes_and_citation(tmp_path):
    trainer = make(tmp_path, optim="memopt_adamw", optim_args="topc=3,decay=0.9,buffer_dtype=bf16", max_steps=2)
    trainer.train()
    trainer.create_model_card()
    trainer.create_model_card(tags=["mine"])  # writing it again replaces the section
    meta, body = card_of(tmp_path)
    assert {"hf_memopt", "memopt_adamw", "mine", "generated_from_trainer"} <= set(meta["tags"])
    assert body.count("### Optimizer: memopt_adamw") == 1
    rows = dict(re.findall(r"^\| (\w+) \| (.+) \|$", body, flags=re.MULTILINE))
    assert rows["optim"] == "memopt_adamw"
    expected = {"topc": "3", "decay": "0.9", "kappa": "1.0", "aggregation": "mean", "key": "group"}
    expected |= {"buffer_dtype": "bf16", "amsgrad": "False", "maximize": "False", "eps": "1e-08"}
    assert {k: rows[k] for k in expected} == expected
    assert rows["betas"] == "(0.9, 0.999)"
    assert rows["learning_rate"].startswith("0.01 ") and rows["weight_decay"].startswith("0.1 ")
    assert rows["max_grad_norm"].startswith("1.0 (the memory stores gradients after clipping")
    stats = inner_optimizer(trainer).memory_stats()
    assert f"({stats['state_bytes']:,} bytes)" in body
    memory, base = stats["memory_bytes"], stats["state_bytes"] - stats["memory_bytes"]
    assert f"gradient memory takes {memory / 1024:.2f} KiB ({memory:,} bytes)" in body
    numel = sum(p.numel() for p in trainer.model.parameters())
    assert memory == numel * (3 * 2 + 4)  # 3 bf16 slots + the fp32 running sum
    assert base == numel * 2 * 4  # AdamW's exp_avg and exp_avg_sq, fp32
    assert f"torch.optim.AdamW state {base / 1024:.2f} KiB ({base:,} bytes)" in body
    assert "Memory Augmented Optimizers for Deep Learning" in body and "2106.10708" in body
    assert "McRae" in body and "ICLR 2022" in body
    assert body.index("### Optimizer: memopt_adamw") < body.index("### Framework versions")


def test_critical_momenta_model_card_cites_both_papers(tmp_path):
    trainer = make(tmp_path, optim="memopt_adamw_cm", optim_args="kappa=0.5", max_steps=2)
    trainer.train()
    trainer.create_model_card()
    meta, body = card_of(tmp_path)
    assert {"hf_memopt", "memopt_adamw_cm"} <= set(meta["tags"])
    rows = dict(re.findall(r"^\| (\w+) \| (.+) \|$", body, flags=re.MULTILINE))
    assert rows["class"].startswith("hf_memopt.CriticalMomentaAdamW")
    assert rows["topc"] == "5" and rows["kappa"] == "0.5" and "aggregation" not in rows
    assert rows["max_grad_norm"].startswith("1.0 (the memory stores momenta built from gradients after clipping")
    assert "critical momenta" in body and "Promoting Exploration in Memory-Augmented Adam" in body
    assert "TMLR 2024" in body and "sHSkJqyQgW" in body and "2307.09638" in body
    assert "malviya2024promoting" in body and "mcrae2022memory" in body and "2106.10708" in body


def test_model_card_before_training_uses_the_arguments(tmp_path):
    trainer = make(tmp_path, optim="memopt_sgd", optim_args="momentum=0.9,topc=4")
    trainer.create_model_card()
    meta, body = card_of(tmp_path)
    assert {"hf_memopt", "memopt_sgd"} <= set(meta["tags"])
    rows = dict(re.findall(r"^\| (\w+) \| (.+) \|$", body, flags=re.MULTILINE))
    assert rows["topc"] == "4" and rows["momentum"] == "0.9" and rows["aggregation"] == "sum"
    assert "betas" not in rows
    assert "Optimizer state: not measured" in body


def test_memopt_trainer_with_another_optimizer_is_the_plain_trainer(tmp_path):
    trainer = make(tmp_path, optim="adamw_torch", max_steps=2, logging_steps=1)
    trainer.train()
    assert not any(k.startswith(LOG_PREFIX) for entry in trainer.state.log_history for k in entry)
    trainer.create_model_card()
    meta, body = card_of(tmp_path)
    assert "hf_memopt" not in meta["tags"] and "### Optimizer:" not in body


def test_plain_trainer_tags_the_model(tmp_path):
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, optim="memopt_rmsprop", max_steps=1),
        train_dataset=ClassificationData(),
    )
    trainer.train()
    # Trainer.push_to_hub, PreTrainedModel.push_to_hub, PEFT and TRL put these in their cards.
    assert {"hf_memopt", "memopt_rmsprop"} <= set(model.model_tags)


def test_optimizer_state_size_is_logged_once_after_the_first_step(tmp_path):
    trainer = make(tmp_path, optim="memopt_adamw", optim_args="topc=3", max_steps=3, logging_steps=2)
    trainer.train()
    sized = [e for e in trainer.state.log_history if LOG_PREFIX + "state_bytes" in e and "loss" not in e]
    assert [e["step"] for e in sized] == [1]
    numel = sum(p.numel() for p in trainer.model.parameters())
    # After one step: AdamW's two fp32 moments plus one stored fp32 gradient and the running sum.
    assert sized[0][LOG_PREFIX + "memory_bytes"] == (3 + 1) * 4 * numel
    assert sized[0][LOG_PREFIX + "state_bytes"] == sized[0][LOG_PREFIX + "memory_bytes"] + 2 * 4 * numel
    # The size check does not take the admissions away from the first logging step.
    first_log = next(e for e in trainer.state.log_history if "loss" in e)
    assert first_log[LOG_PREFIX + "admissions"] == 2 * len(list(trainer.model.parameters()))


def test_model_card_names_the_executor_of_each_param_group(tmp_path):
    trainer = make(tmp_path, optim="memopt_adamw", max_steps=1)
    trainer.train()
    optimizer = inner_optimizer(trainer)
    if getattr(optimizer, "executor_for", None) is None:
        # Optimizers that do not say which executor ran a group get no such lines.
        assert executors(optimizer) == []
        trainer.create_model_card()
        assert "Executor that ran each param group" not in card_of(tmp_path)[1]
        return
    trainer.create_model_card()
    body = card_of(tmp_path)[1]
    groups = [g for g in optimizer.param_groups if g["params"]]
    lines = [line for line in body.splitlines() if line.startswith("- param group ")]
    assert len(lines) == len(groups)
    for line, group in zip(lines, groups):
        assert line.endswith(f": {optimizer.executor_for(group)}")
