"""SST-2 stand-in: the Rotten Tomatoes sentences SST-2 was built from, with human sentiment ratings."""

from __future__ import annotations

import os

from .cache import missing_examples_extra

try:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
except ModuleNotFoundError as _err:
    raise missing_examples_extra(_err, "memopt_data.sentiment") from _err

from .archives import NESTED_SEP, VADER_SENTIMENT, EmbeddedDataError, materialize
from .provenance import SST2_STANDIN
from .splits import hash_unit, in_validation

_ROOT = f"vaderSentiment-{VADER_SENTIMENT.version}"
_REVIEWS = f"{_ROOT}/additional_resources/hutto_ICWSM_2014.tar.gz{NESTED_SEP}hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"
HINT = (
    "give run_glue.py your own data with --train_file/--validation_file (csv or json with 'sentence' and 'label' "
    "columns), or use the Hub's GLUE SST-2 (--task_name sst2 with network access)"
)
FEATURES = Features(
    {
        "sentence": Value("string"),
        "label": ClassLabel(names=["negative", "positive"]),
        "idx": Value("int32"),
        "rating": Value("float64"),
    }
)


def parse_ratings(text: str) -> list[tuple[int, float, str]]:
    """Parse ``id<TAB>mean_rating<TAB>sentence`` lines (CRLF or LF) into ``(id, rating, sentence)`` tuples.

    Raises:
        EmbeddedDataError: on a line that does not have this shape, rather than skipping it silently.
    """
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].strip():
            raise EmbeddedDataError(f"{REVIEWS_FILE} line {lineno} is not 'id<TAB>rating<TAB>text': {line[:80]!r}")
        try:
            rows.append((int(parts[0]), float(parts[1]), parts[2].strip()))
        except ValueError as err:
            raise EmbeddedDataError(f"{REVIEWS_FILE} line {lineno}: bad id or rating: {line[:80]!r}") from err
    return rows


def reviews_file(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of the cached ratings file (fetched and checked on first use)."""
    folder = materialize(
        VADER_SENTIMENT,
        "movie_reviews",
        {_REVIEWS: REVIEWS_FILE, f"{_ROOT}/LICENSE.txt": "LICENSE.txt"},
        cache_dir,
        hint=HINT,
    )
    return str(folder / REVIEWS_FILE)


def load_sst2_standin(
    cache_dir: str | os.PathLike[str] | None = None, *, validation_fraction: float = 0.1
) -> DatasetDict:
    """Binary sentence sentiment shaped like GLUE SST-2: columns ``sentence``, ``label``, ``idx`` (+ ``rating``).

    The 10,605 sentences of Pang & Lee's Rotten Tomatoes snippets, each with the mean of human ratings on
    -4..+4 (Hutto & Gilbert 2014). ``label`` is 1 (positive) when the mean rating is > 0 and 0 when < 0; the
    sentences rated exactly 0 are dropped. No split is shipped, so a sentence goes to ``validation`` when the
    hash of its id falls below ``validation_fraction``: the split is the same on every machine and run. Rows are
    in a fixed order given by another hash of the id, because the file lists all positive sentences first.

    Args:
        cache_dir: overrides ``HF_MEMOPT_CACHE`` / ``~/.cache/hf_memopt``.
        validation_fraction: expected share of the validation split.

    Raises:
        EmbeddedDataError: the archive could not be fetched or verified (message says how to provide data instead).
    """
    with open(reviews_file(cache_dir), encoding="utf-8") as fh:
        rows = parse_ratings(fh.read())
    splits: dict[str, dict[str, list]] = {
        name: {"sentence": [], "label": [], "idx": [], "rating": []} for name in ("train", "validation")
    }
    # The file lists Pang & Lee's positive sentences first, then the negative ones: a fixed pseudo-random order
    # makes "the first N rows" (--max_train_samples) a balanced sample, as it is for the shuffled GLUE files.
    rows.sort(key=lambda row: hash_unit(str(row[0]), "sst2-standin-order"))
    for idx, rating, sentence in rows:
        if rating == 0.0:
            continue
        split = "validation" if in_validation(str(idx), "sst2-standin", validation_fraction) else "train"
        cols = splits[split]
        cols["sentence"].append(sentence)
        cols["label"].append(int(rating > 0.0))
        cols["idx"].append(idx)
        cols["rating"].append(rating)
    SST2_STANDIN.log()
    info = SST2_STANDIN.dataset_info(FEATURES)
    return DatasetDict(
        {name: Dataset.from_dict(cols, features=FEATURES, info=info, split=name) for name, cols in splits.items()}
    )
