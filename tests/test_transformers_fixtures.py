"""Shared builders for the transformers integration tests (no tests here).

Tiny models from configs (a few thousand parameters, no dropout so runs are
deterministic), synthetic data, and TrainingArguments defaults that keep every run on
the CPU, offline and quiet. The hub is never contacted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_memopt  # noqa: F401  (registers the optim names when hf_memopt/__init__ does)
from hf_memopt.integrations.transformers import register

register()  # explicit too: the tests must not depend on where the package calls it

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test with one intra-op thread, then restore the previous count.

    The models are tiny: a second thread buys nothing, and on a busy 2-core machine
    torch's spinning worker threads made backward passes ~10x slower. Restored so other
    test modules in the same session keep their setting.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ClassificationData(torch.utils.data.Dataset):
    """Random token sequences; the label is a function of the first token (learnable)."""

    def __init__(self, n: int = 64, length: int = 8, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)
        self.labels = (self.ids[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class LMData(torch.utils.data.Dataset):
    """Random token sequences for causal LM training (labels = inputs)."""

    def __init__(self, n: int = 32, length: int = 8, seed: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """BERT classifier, 1 layer, hidden 16: decay and no-decay parameters (biases, LayerNorm)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    """Llama causal LM, 1 layer, hidden 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def training_args(output_dir: str | os.PathLike, **overrides: Any) -> TrainingArguments:
    """CPU, offline, quiet TrainingArguments for a few steps; ``overrides`` win."""
    kwargs: dict[str, Any] = dict(
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=2,
        save_strategy="no",
        seed=42,
    )
    kwargs.update(overrides)
    return TrainingArguments(str(output_dir), **kwargs)


def inner_optimizer(trainer: Any) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's AcceleratedOptimizer wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def memory_slots(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The stored gradients of ``p`` (state keys ``memory_0`` .. ``memory_{C-1}``), in slot order."""
    state = optimizer.state[p]
    slots = sorted(
        (k for k in state if k.startswith("memory_") and k[len("memory_") :].isdigit()),
        key=lambda k: int(k.split("_")[1]),
    )
    return [state[k] for k in slots]


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    """Run ``code`` in a fresh interpreter (repo on the path, offline); return stdout."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
