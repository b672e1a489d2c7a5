#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task or your own csv/json, with any optimizer including hf_memopt's.

The shape of transformers' ``examples/pytorch/text-classification/run_glue.py``: ``ModelArguments``,
``DataTrainingArguments`` and ``TrainingArguments`` parsed by ``HfArgumentParser``, so every Trainer flag works::

    python examples/glue/run_glue.py --task_name sst2 --optim memopt_adamw --optim_args "topc=5,decay=0.9" \\
        --do_train --do_eval --output_dir runs/sst2-memopt

Data: ``--task_name`` loads ``nyu-mll/glue`` from the Hub. Without the Hub (``HF_HUB_OFFLINE=1``, or the Hub
failing) sst2 and mnli use real stand-ins from package registries (``examples/memopt_data``; the log names them) and
the other tasks stop with a message; ``--data_source embedded`` skips the Hub. ``--train_file/--validation_file``
take your own data. Model: ``--model_name_or_path`` defaults to all-MiniLM-L6-v2 (Hub, else the registry copy);
``--config_name`` without a model builds a randomly initialised model from that config (used by the tests).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
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

# The example's helpers live beside it (glue_metrics) and one level up (memopt_data, the examples' data layer,
# which is not part of the hf_memopt package): a script run by path finds neither on its own.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from glue_metrics import GLUE_TASKS, build_compute_metrics  # noqa: E402

from memopt_data import (  # noqa: E402
    DATA_SOURCES,
    MINILM,
    SNLI_STANDIN,
    SST2_STANDIN,
    Provenance,
    add_to_model_card,
    load_snli_standin,
    load_sst2_standin,
    minilm_model_dir,
    resolve,
    scripts,
)

logger = logging.getLogger(__name__)

TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# Column pairs recognised in user files, in order of preference (GLUE's own names).
_KNOWN_KEYS = [keys for keys in TASK_TO_KEYS.values() if keys[1] is not None] + [("sentence", None), ("text", None)]
HUB_DATASET = "nyu-mll/glue"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
STANDINS: dict[str, tuple[Provenance, object]] = {
    "sst2": (SST2_STANDIN, load_sst2_standin),
    "mnli": (SNLI_STANDIN, load_snli_standin),
}


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or Hub id. Default: all-MiniLM-L6-v2 (the Hub, or its registry copy without the "
            "Hub). Leave unset together with --config_name to train a model from scratch."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config folder/file/Hub id if not the model's (from scratch if no model)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer if not the model's (default: all-MiniLM-L6-v2's)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose classification head has another number of labels."}
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, and how to tokenize it."""

    task_name: str | None = field(default=None, metadata={"help": "GLUE task.", "choices": list(GLUE_TASKS)})
    data_source: str = field(
        default="auto",
        metadata={
            "help": "auto: the Hub unless HF_HUB_OFFLINE=1 or it fails, then the registry stand-in (sst2, mnli "
            "and the default model); hub: only the Hub; embedded: only the registry stand-ins.",
            "choices": list(DATA_SOURCES),
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "csv or json training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json validation file."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every input to max_seq_length (default: pad each batch to its longest input)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize instead of using the datasets cache."})

    def __post_init__(self) -> None:
        if self.task_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Give --task_name, or --train_file/--validation_file.")
        for f in (self.train_file, self.validation_file):
            if f is not None and f.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"{f}: --train_file/--validation_file must be csv or json")


def load_raw_data(data_args: DataTrainingArguments, cache_dir: str | None) -> tuple[DatasetDict, Provenance | None]:
    """The raw splits, and the provenance of the registry stand-in when one was used."""
    task = data_args.task_name
    if task is None:
        files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file)) if v}
        ext = next(iter(files.values())).rsplit(".", 1)[-1]
        return load_dataset("json" if ext == "jsonl" else ext, data_files=files, cache_dir=cache_dir), None

    def from_hub() -> DatasetDict:
        return load_dataset(HUB_DATASET, task, cache_dir=cache_dir)

    if task not in STANDINS:
        if data_args.data_source == "embedded":
            raise SystemExit(
                f"GLUE {task} has no registry stand-in (only {', '.join(STANDINS)} have). Use the Hub "
                "(--data_source hub or auto, without HF_HUB_OFFLINE) or your own --train_file/--validation_file."
            )
        try:
            return from_hub(), None
        except Exception as err:
            raise SystemExit(
                f"Could not load GLUE {task} from the Hub ({err}). Without the Hub only {', '.join(STANDINS)} have "
                "registry stand-ins; give your own --train_file/--validation_file instead."
            ) from err
    prov, loader = STANDINS[task]
    raw, used = resolve(data_args.data_source, f"GLUE {task}", from_hub, loader, prov.name)  # type: ignore[arg-type]
    return raw, (prov if used == "embedded" else None)


def resolve_default_model(data_source: str, cache_dir: str | None) -> tuple[str, Provenance | None]:
    """all-MiniLM-L6-v2 from the Hub or its registry copy: (path or id, provenance if the copy was used)."""

    def from_hub() -> str:
        AutoConfig.from_pretrained(DEFAULT_MODEL, cache_dir=cache_dir)  # fails fast when the Hub is unreachable
        return DEFAULT_MODEL

    path, used = resolve(data_source, DEFAULT_MODEL, from_hub, lambda: str(minilm_model_dir()), MINILM.name)
    return path, (MINILM if used == "embedded" else None)


def text_columns(data: DatasetDict, task: str | None) -> tuple[str, str | None]:
    """The one or two input text columns."""
    if task is not None:
        return TASK_TO_KEYS[task]
    split = data["train"] if "train" in data else next(iter(data.values()))
    strings = [
        c for c, f in split.features.items() if c != "label" and getattr(f, "dtype", None) in ("string", "large_string")
    ]
    for first, second in _KNOWN_KEYS:
        if first in strings and (second is None or second in strings):
            return first, second
    if not strings:
        raise ValueError(f"no text column in {list(split.features)}")
    return strings[0], (strings[1] if len(strings) > 1 else None)


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
    # transformers 5.x multiplies the loss by the world size under average_tokens_across_devices=True
    # whenever the model's forward takes **kwargs, and a sequence classifier's mean loss does not divide
    # by the global item count: under DDP the logged loss and the gradients were 2x on 2 processes. The
    # per-example mean loss is already what DDP averages, so the script defaults it to False.
    parser.set_defaults(average_tokens_across_devices=False)
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].endswith(".json"):
        with open(os.path.abspath(args[0]), encoding="utf-8") as fh:
            values = json.load(fh)
        values = {**scripts.script_defaults(), **values}
        values.setdefault("average_tokens_across_devices", False)
        if ddp_on_cpu(values.get("deepspeed")):
            values.setdefault("use_cpu", True)
        return parser.parse_dict(values)
    if ddp_on_cpu(any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in args)):
        parser.set_defaults(use_cpu=True)
    return parser.parse_args_into_dataclasses(args=args)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run training and/or evaluation; returns ``{"train": metrics, "eval": metrics}`` (the parts that ran)."""
    model_args, data_args, training_args = parse_args(argv)
    scripts.setup_logging(training_args, __name__, "glue_metrics")
    scripts.log_run_setup(logger, training_args)
    set_seed(training_args.seed)

    raw, data_prov = load_raw_data(data_args, model_args.cache_dir)
    task = data_args.task_name
    is_regression = task == "stsb" or (
        task is None and raw["train" if "train" in raw else "validation"].features["label"].dtype.startswith("float")
    )
    label_feature = raw["train" if "train" in raw else "validation"].features["label"]
    if is_regression:
        label_list: list = []
    elif hasattr(label_feature, "names"):
        label_list = list(label_feature.names)
    else:
        label_list = sorted({label for split in raw.values() for label in split["label"]})
    num_labels = 1 if is_regression else len(label_list)

    sources: dict[str, Provenance] = {}
    if data_prov is not None:
        sources["training and validation data"] = data_prov
    model_id = model_args.model_name_or_path
    finetuned_from = model_id
    card_license = None  # the Trainer fills it in for Hub models; the defaults are Apache-2.0 either way
    if model_id is None and model_args.config_name is None:
        model_id, model_prov = resolve_default_model(data_args.data_source, model_args.cache_dir)
        finetuned_from, card_license = DEFAULT_MODEL, "apache-2.0"
        if model_prov is not None:
            sources["base model"] = model_prov
    tokenizer_id = model_args.tokenizer_name or model_id
    if tokenizer_id is None:
        tokenizer_id, tok_prov = resolve_default_model(data_args.data_source, model_args.cache_dir)
        if tok_prov is not None:
            sources["tokenizer"] = tok_prov

    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_id, num_labels=num_labels, finetuning_task=task, **hub_kwargs
    )
    if not is_regression:
        config.label2id = {str(label): i for i, label in enumerate(label_list)}
        config.id2label = dict(enumerate(str(label) for label in label_list))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_id, **hub_kwargs)
    if model_id is None:
        logger.warning("No --model_name_or_path: training a randomly initialised model from %s", model_args.config_name)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_id, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
        )

    key1, key2 = text_columns(raw, task)
    # Files may carry labels as strings or unsorted ints; the model wants 0..n-1 in label_list order.
    label_to_id = None if (is_regression or task is not None) else {label: i for i, label in enumerate(label_list)}
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        out = tokenizer(*texts, padding=padding, max_length=max_len, truncation=True)
        labels = batch["label"]
        # Written as "labels" (what the model's forward takes): datasets 5 keeps the input column's type for an
        # output column of the same name, so string labels mapped back into "label" would come out as "0"/"1".
        out["labels"] = labels if label_to_id is None else [label_to_id[label] for label in labels]
        return out

    eval_split = "validation_matched" if task == "mnli" and "validation_matched" in raw else "validation"

    def prepare(split: str, limit: int | None):
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return ds.map(
                preprocess,
                batched=True,
                remove_columns=ds.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )

    train_ds = eval_ds = None
    if training_args.do_train:
        if "train" not in raw:
            raise ValueError("--do_train needs a train split (--train_file or a GLUE task)")
        train_ds = prepare("train", data_args.max_train_samples)
    if training_args.do_eval or training_args.eval_strategy != "no":
        if eval_split not in raw:
            raise ValueError("evaluation needs a validation split (--validation_file or a GLUE task)")
        eval_ds = prepare(eval_split, data_args.max_eval_samples)

    if data_args.pad_to_max_length:
        collator = default_data_collator
    else:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    trainer = MemOptTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=build_compute_metrics(task, is_regression),
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
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics

    if trainer.is_world_process_zero():
        if task is None:
            files = [Path(f).name for f in (data_args.train_file, data_args.validation_file) if f]
            dataset, dataset_tags, dataset_args = ", ".join(files), None, None
            card_dataset, card_config = files[-1] if files else "local files", None
        elif data_prov is not None:
            dataset, dataset_tags, dataset_args = f"{data_prov.name} (stand-in for GLUE {task.upper()})", None, None
            card_dataset, card_config = data_prov.archive.requirement, None
        else:
            dataset, dataset_tags, dataset_args = f"GLUE {task.upper()}", HUB_DATASET, task
            card_dataset, card_config = HUB_DATASET, task
        trainer.create_model_card(
            language="en",
            license=card_license,
            finetuned_from=finetuned_from,
            tasks="text-classification",
            dataset=dataset,
            dataset_tags=dataset_tags,
            dataset_args=dataset_args,
        )
        card = Path(training_args.output_dir) / "README.md"
        add_to_model_card(card, sources)
        eval_metrics = results.get("eval") or scripts.last_eval_metrics(trainer)
        if eval_metrics:
            scripts.fill_model_index(
                card,
                task_type="text-classification",
                dataset_type=card_dataset,
                dataset_name=dataset,
                dataset_config=card_config,
                metrics=eval_metrics,
            )
        with open(Path(training_args.output_dir) / "hf_memopt_sources.json", "w", encoding="utf-8") as fh:
            json.dump({role: prov.as_dict() for role, prov in sources.items()}, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
    shutdown_process_group()  # under `accelerate launch`: Trainer leaves the process group up
