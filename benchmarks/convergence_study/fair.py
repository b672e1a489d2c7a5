"""The fair-budget protocol of the paper's regimes: every optimizer gets the same number of trials at seed 0
(memopt's including its ``(topc, decay)``), then more seeds at each one's best trial; and the paired
comparison of the two optimizers of a pair over those seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoints
from .runner import train_once
from .store import append, append_epoch, load_rows, run_key
from .tasks import Task

MEMORY_GRID = ({"topc": 5, "decay": 0.7}, {"topc": 10, "decay": 0.9}, {"topc": 20, "decay": 0.99})
FAIR_SEEDS = (0, 1, 2)


def fair_grid(task: Task, optimizer: str) -> list[tuple[float, dict[str, Any]]]:
    """The trials of ``optimizer`` on a fair-budget task: 9 for every optimizer."""
    assert task.base_lrs is not None
    for base, memopt in task.pairs:
        if optimizer == base:
            return [(lr, {}) for lr in task.base_lrs[base]]
        if optimizer == memopt:
            lrs = task.memopt_lrs or task.base_lrs[base][1::3]
            return [(lr, dict(m)) for lr in lrs for m in MEMORY_GRID]
    raise ValueError(f"{optimizer} is not in the pairs of {task.name}")


def fair_runs(rows, task: Task, optimizer: str, steps: int, lr=None, memory=None, seed=None):
    """The runs of ``optimizer`` on ``task`` at this length, narrowed to a trial and a seed when given."""
    return [
        r
        for r in rows
        if r["task"] == task.name
        and r["optimizer"] == optimizer
        and r.get("steps") == steps
        and (lr is None or r["lr"] == lr)
        and (memory is None or r["memory"] == memory)
        and (seed is None or r["seed"] == seed)
    ]


def fair_best(rows, task: Task, optimizer: str, steps: int) -> tuple[float, dict[str, Any]] | None:
    """The grid point with the best seed-0 value (ties: the first in grid order)."""
    scored = []
    for lr, memory in fair_grid(task, optimizer):
        r = fair_runs(rows, task, optimizer, steps, lr, memory, FAIR_SEEDS[0])
        if r and math.isfinite(r[0]["final"]):
            scored.append((r[0]["final"], lr, memory))
    if not scored:
        return None
    pick = max if task.higher_is_better else min
    _, lr, memory = pick(scored, key=lambda t: t[0])
    return lr, memory


@dataclass(frozen=True)
class PairedDifference:
    """memopt minus its base at each one's best trial, paired by seed (same initialisation and data order)."""

    n: int
    mean: float
    low: float  # the 95% confidence interval of the mean difference (Student's t, n - 1 degrees of freedom)
    high: float
    seeds: tuple[int, ...]

    def verdict(self, higher_is_better: bool) -> str:
        """ "no difference detected at n seeds" when the interval holds 0, else which optimizer was better."""
        if self.n < 2:
            return f"{self.n} paired seed(s): no interval"
        if self.low <= 0.0 <= self.high:
            return f"no difference detected at {self.n} seeds"
        better = (self.mean > 0) == higher_is_better
        return f"memopt {'better' if better else 'worse'} at {self.n} seeds"


def paired_difference(base: Sequence[dict[str, Any]], memopt: Sequence[dict[str, Any]]) -> PairedDifference:
    """The mean of ``memopt - base`` over the seeds both have run, with its 95% t interval (NaN below 2 seeds)."""
    by_seed = {r["seed"]: r["final"] for r in base}
    pairs = sorted((r["seed"], r["final"] - by_seed[r["seed"]]) for r in memopt if r["seed"] in by_seed)
    diffs = [d for _, d in pairs]
    n = len(diffs)
    if n < 2:
        mean = diffs[0] if diffs else math.nan
        return PairedDifference(n, mean, math.nan, math.nan, tuple(s for s, _ in pairs))
    from scipy.stats import t

    mean = statistics.mean(diffs)
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half, tuple(s for s, _ in pairs))


def run_fair(
    task: Task,
    out: Path,
    *,
    optimizers: Sequence[str] | None = None,
    stage: str = "all",
    lrs: Sequence[float] | None = None,
    memory: Sequence[dict[str, Any]] | None = None,
    epochs: int | None = None,
    seeds: Sequence[int] | None = None,
    checkpoint_dir: Path | None = None,
    past_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Stage ``tune``: every grid point at seed 0; stage ``seeds``: ``seeds`` (default: the other
    :data:`FAIR_SEEDS`) at each optimizer's best. Runs already in ``out`` are not repeated; each finished run
    is appended to it, and with ``checkpoint_dir`` a stopped run continues from its last evaluation."""
    steps = epochs * task.eval_every if epochs else task.steps
    if task.threads:  # digits: tiny ops, where a second thread only adds synchronisation
        torch.set_num_threads(task.threads)
    optimizers = optimizers or [o for pair in task.pairs for o in pair]
    extra_seeds = [s for s in seeds if s != FAIR_SEEDS[0]] if seeds else FAIR_SEEDS[1:]
    for current in ("tune", "seeds") if stage == "all" else (stage,):
        for optimizer in optimizers:
            rows = load_rows(out)
            if current == "tune":
                jobs = [(lr, m, FAIR_SEEDS[0]) for lr, m in fair_grid(task, optimizer) if not lrs or lr in lrs]
                if memory:
                    jobs = [j for j in jobs if not j[1] or j[1] in memory]
            else:
                best = fair_best(rows, task, optimizer, steps)
                if best is None:
                    print(f"{task.name} {optimizer}: no tuning run yet, no seeds to add")
                    continue
                jobs = [(best[0], best[1], s) for s in extra_seeds]
            for lr, mem, seed in jobs:
                if fair_runs(rows, task, optimizer, steps, lr, mem, seed):
                    continue
                if past_stop():
                    print(f"stop time reached: not starting {task.name} {optimizer} lr={lr:g} seed={seed}")
                    return
                key = run_key(task.name, optimizer, lr, seed, mem, steps)
                ckpt = checkpoints.path_for(checkpoint_dir, key) if checkpoint_dir else None
                row = train_once(
                    task,
                    optimizer,
                    lr,
                    seed,
                    mem,
                    steps=steps,
                    checkpoint=ckpt,
                    on_epoch=lambda epoch, key=key: append_epoch(out, key, epoch),
                )
                row["stage"] = current
                append(out, row)
                if ckpt is not None:
                    ckpt.unlink(missing_ok=True)
                extra = f", test {row['test_at_best']:.2f} at step {row['best_step']}" if "test_at_best" in row else ""
                print(
                    f"{task.name} {optimizer:<16} lr={lr:g} {mem or ''} seed={seed}: {task.metric} "
                    f"{row['final']:.4g}{extra} ({row['seconds']:.0f} s)",
                    flush=True,
                )
