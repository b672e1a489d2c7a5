"""The study's results file: JSON lines, one per finished run, plus one per finished epoch of a long run.

Appending a line is the only write, so a run that is stopped loses nothing already recorded. Epoch lines carry
``"epoch_of"`` (the run they belong to) and are kept apart from run lines: :func:`load_rows` returns the runs,
:func:`load_epochs` the epochs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path("runs/convergence.jsonl")

#: The fields that name one run: a second run with all of them equal is the same run.
RUN_KEY = ("task", "optimizer", "lr", "seed", "memory", "steps")


def append(out: Path, row: dict[str, Any]) -> None:
    """Add ``row`` as one line at the end of ``out`` (created with its folder if needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _lines(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The finished runs recorded in ``out`` (none when it does not exist)."""
    return [r for r in _lines(out) if "epoch_of" not in r]


def load_epochs(out: Path, run: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The epoch lines in ``out``, of every run or only of ``run`` (a :func:`run_key` dict)."""
    return [r for r in _lines(out) if "epoch_of" in r and (run is None or r["epoch_of"] == run)]


def run_key(task: str, optimizer: str, lr: float, seed: int, memory: dict[str, Any], steps: int) -> dict[str, Any]:
    """The identity of one run (:data:`RUN_KEY`), as stored with its checkpoint and its epoch lines."""
    return dict(zip(RUN_KEY, (task, optimizer, lr, seed, memory, steps)))


def append_epoch(out: Path, run: dict[str, Any], row: dict[str, Any]) -> bool:
    """Record one finished epoch of ``run`` unless that step is already recorded (a resumed run repeats the
    epochs after its last checkpoint); returns whether a line was written."""
    if any(r["step"] == row["step"] for r in load_epochs(out, run)):
        return False
    append(out, {"epoch_of": run, **row})
    return True


def done(rows, task, optimizer, lr, seed, memory) -> bool:
    """Whether ``rows`` hold a finished run with these settings (any length)."""
    return any(
        r["task"] == task
        and r["optimizer"] == optimizer
        and r["lr"] == lr
        and r["seed"] == seed
        and r["memory"] == memory
        for r in rows
    )
