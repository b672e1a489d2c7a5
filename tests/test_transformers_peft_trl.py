"""PEFT LoRA and TRL's SFTTrainer with optim="memopt_adamw"."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_transformers_fixtures import (  # noqa: F401 (fixture)
    LMData,
    inner_optimizer,
    memory_slots,
    one_torch_thread,
    tiny_llama,
    training_args,
)
from transformers import Trainer

import hf_memopt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("buffer_dtype", "element_size"), [("fp32", 4), ("bf16", 2)])
def test_lora_memory_covers_only_the_adapter(tmp_path, buffer_dtype, element_size):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    adapter = [p for p in model.parameters() if p.requires_grad]
    adapter_elements = sum(p.numel() for p in adapter)
    assert 0 < adapter_elements < sum(p.numel() for p in model.parameters()) // 10

    topc = 3
    args = training_args(
        tmp_path,
        optim="memopt_adamw",
        optim_args=f"topc={topc},buffer_dtype={buffer_dtype}",
        max_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=LMData())
    trainer.train()

    optimizer = inner_optimizer(trainer)
    assert isinstance(optimizer, hf_memopt.MemoryAugmentedAdamW)
    decay, no_decay = optimizer.param_groups
    assert no_decay["params"] == []  # LoRA matrices only: the no-decay group is empty
    assert {id(p) for p in decay["params"]} == {id(p) for p in adapter}
    slot_bytes = sum(s.numel() * s.element_size() for p in adapter for s in memory_slots(optimizer, p))
    assert slot_bytes == topc * adapter_elements * element_size
    # memory_stats also counts the fp32 running sum (4 bytes per element).
    assert optimizer.memory_stats()["memory_bytes"] == slot_bytes + 4 * adapter_elements

    # The checkpoint's adapter card, written by PEFT, carries the tags the flag added.
    card = (tmp_path / "checkpoint-3" / "README.md").read_text()
    tags = yaml.safe_load(card.split("---\n", 2)[1])["tags"]
    assert {"hf_memopt", "memopt_adamw", "lora"} <= set(tags)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran to home big small red blue".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    return tokenizer, words


@pytest.mark.parametrize(
    ("optim", "cls_name"), [("memopt_adamw", "MemoryAugmentedAdamW"), ("memopt_adamw_cm", "CriticalMomentaAdamW")]
)
def test_trl_sft_trainer_with_the_flag(tmp_path, optim, cls_name):
    trl = pytest.importorskip("trl", reason="TRL is not installed")
    from datasets import Dataset

    tokenizer, words = _word_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g).tolist()) for _ in range(16)]
    config = trl.SFTConfig(
        str(tmp_path),
        optim=optim,
        optim_args="topc=2",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        max_steps=3,
        per_device_train_batch_size=4,
        save_strategy="no",
        max_length=16,
    )
    assert config.to_dict()["optim"] == optim and config.optim_args.startswith("topc=2,")
    model = tiny_llama(vocab_size=len(tokenizer))
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    optimizer = inner_optimizer(trainer)
    assert type(optimizer) is getattr(hf_memopt, cls_name)
    assert all(int(optimizer.state[p]["memory_count"]) == 2 for p in model.parameters())
    assert all(int(optimizer.state[p]["step"]) == 3 for p in model.parameters())
    assert {"trl", "sft", "hf_memopt", optim} <= set(model.model_tags)
