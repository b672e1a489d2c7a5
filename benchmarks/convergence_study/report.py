"""Markdown tables of the study's results file (``report``), for the older tasks and the fair-budget ones."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .fair import FAIR_SEEDS, fair_best, fair_grid, fair_runs, paired_difference
from .tasks import PTB_EPOCHS, TASKS, Task


def runs_at(rows, task, optimizer, lr=None, memory=None):
    """The runs of an older task with ``optimizer`` (default memory unless given), at ``lr`` when given."""
    memory = {} if memory is None else memory
    return [
        r
        for r in rows
        if r["task"] == task.name
        and r["optimizer"] == optimizer
        and r["memory"] == memory
        and (lr is None or r["lr"] == lr)
    ]


def best_lr(rows, task: Task, optimizer: str) -> float | None:
    """The lr of the grid with the best mean final value over seeds (None before any run)."""
    means = {}
    for lr in task.lrs:
        runs = runs_at(rows, task, optimizer, lr)
        if runs:
            means[lr] = statistics.mean(r["final"] for r in runs)
    if not means:
        return None
    pick = max if task.higher_is_better else min
    return pick(means, key=means.get)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g} (n={len(values)})"


def _steps_to(run, target, higher) -> float:
    for step, value in run["curve"]:
        if (value >= target) if higher else (value <= target):
            return step
    return math.inf


def _steps_summary(steps: list[float]) -> str:
    reached = [s for s in steps if math.isfinite(s)]
    if not reached:
        return f"never (0/{len(steps)})"
    return f"{statistics.median(reached):.0f} ({len(reached)}/{len(steps)})"


def _win_tie_loss(rows, task: Task, lr: float, tie: float) -> tuple[int, int, int]:
    """memopt against AdamW at one learning rate, paired by seed: a difference within ``tie`` is a tie
    (absolute for accuracy, relative to AdamW's value for losses)."""
    wins = ties = losses = 0
    memopt = {r["seed"]: r for r in runs_at(rows, task, "memopt", lr)}
    for ra in runs_at(rows, task, "adamw", lr):
        rm = memopt.get(ra["seed"])
        if rm is None:
            continue
        diff = (rm["final"] - ra["final"]) * (1 if task.higher_is_better else -1)
        scale = 1.0 if task.higher_is_better else abs(ra["final"])
        if abs(diff) <= tie * scale:
            ties += 1
        elif diff > 0:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def knobs(memory: dict[str, Any]) -> str:
    """``(topc, decay)`` of a memory setting, ``-`` for the defaults."""
    return f"({memory['topc']}, {memory['decay']})" if memory else "-"


def report_fair(rows, task: Task, tie: float = 0.005) -> None:
    """Tables of one fair-budget task, once per recorded length (steps): each optimizer at its best trial, the
    paired difference of each pair over the seeds both have run, and every trial of the tuning grid.
    ``tie``: the |difference| counted as a tie in W/T/L (absolute for accuracy, relative for losses)."""
    for steps in sorted({r["steps"] for r in rows if r["task"] == task.name and "steps" in r}):
        length = f"{steps} steps" + (
            f" = {steps // task.eval_every} epochs ({steps / task.steps:.0%} of the paper's {PTB_EPOCHS})"
            if task.name == "ptb"
            else ""
        )
        print(f"\n**{task.name}**, {task.metric}, {length}. At each optimizer's best trial (seed 0 picks it):\n")
        print(
            "| optimizer | trials run | best lr | best (topc, decay) | mean ± std over seeds | W/T/L vs base by seed"
            " | steps to target |" + (" test ppl at best-val epoch |" if task.final == "best" else "")
        )
        print("|---|---|---|---|---|---|---|" + ("---|" if task.final == "best" else ""))
        for base, memopt in task.pairs:
            picks = {o: fair_best(rows, task, o, steps) for o in (base, memopt)}
            runs = {o: fair_runs(rows, task, o, steps, *picks[o]) if picks[o] else [] for o in (base, memopt)}
            if not runs[base] and not runs[memopt]:
                continue
            means = [statistics.mean(r["final"] for r in v) for v in runs.values() if v]
            target = (min(means) - 0.01) if task.higher_is_better else max(means) * 1.05
            for o in (base, memopt):
                if not runs[o]:
                    print(f"| {o} | 0 | - | - | - | - | - |" + (" - |" if task.final == "best" else ""))
                    continue
                trials = len(
                    [g for g in fair_grid(task, o) if fair_runs(rows, task, o, steps, g[0], g[1], FAIR_SEEDS[0])]
                )
                lr, memory = picks[o]
                wtl = "-"
                if o == memopt and runs[base]:
                    w = t = lo = 0
                    by_seed = {r["seed"]: r for r in runs[base]}
                    for r in runs[memopt]:
                        if r["seed"] not in by_seed:
                            continue
                        diff = (r["final"] - by_seed[r["seed"]]["final"]) * (1 if task.higher_is_better else -1)
                        scale = 1.0 if task.higher_is_better else abs(by_seed[r["seed"]]["final"])
                        if abs(diff) <= tie * scale:
                            t += 1
                        elif diff > 0:
                            w += 1
                        else:
                            lo += 1
                    wtl = f"{w}/{t}/{lo}"
                to = _steps_summary([_steps_to(r, target, task.higher_is_better) for r in runs[o]])
                test = ""
                if task.final == "best":
                    test = f" {_fmt([r['test_at_best'] for r in runs[o]])} |"
                print(
                    f"| {o} | {trials}/9 | {lr:g} | {knobs(memory)} | {_fmt([r['final'] for r in runs[o]])} | {wtl} | "
                    f"{to} |{test}"
                )
        _report_paired(rows, task, steps)
        tgt = "minus 0.01" if task.higher_is_better else "x 1.05"
        print(f"\nSteps to target: median steps to the pair's worse mean {tgt} (runs that got there / runs).")
        print(f"\nEvery trial of the tuning grid (seed 0), {task.name}, {length}:\n")
        per_epoch = task.final == "best"
        print(
            "| optimizer | lr | (topc, decay) | value | seconds |"
            + (
                " validation ppl per epoch | test ppl per epoch |\n|---|---|---|---|---|---|---|"
                if per_epoch
                else "\n|---|---|---|---|---|"
            )
        )
        for base, memopt in task.pairs:
            for o in (base, memopt):
                for lr, memory in fair_grid(task, o):
                    r = fair_runs(rows, task, o, steps, lr, memory, FAIR_SEEDS[0])
                    if r:
                        extra = ""
                        if per_epoch:
                            val = ", ".join(f"{v:.1f}" for _, v in r[0]["curve"][1:])
                            test = ", ".join(f"{d['test']:.1f}" for _, d in r[0].get("side", [])[1:])
                            extra = f" {val} | {test} |"
                        print(
                            f"| {o} | {lr:g} | {knobs(memory)} | {r[0]['final']:.4g} | {r[0]['seconds']:.1f} |{extra}"
                        )


def _report_paired(rows, task: Task, steps: int) -> None:
    """memopt minus base per pair, each at its best trial, over the seeds both ran: mean and 95% interval."""
    lines = []
    for base, memopt in task.pairs:
        picks = {o: fair_best(rows, task, o, steps) for o in (base, memopt)}
        if not all(picks.values()):
            continue
        d = paired_difference(
            fair_runs(rows, task, base, steps, *picks[base]), fair_runs(rows, task, memopt, steps, *picks[memopt])
        )
        if d.n == 0:
            continue
        lines.append(
            f"| {memopt} - {base} | {d.n} | {d.mean:+.4g} | [{d.low:+.4g}, {d.high:+.4g}] | {d.verdict(task.higher_is_better)} |"
        )
    if lines:
        better = "higher" if task.higher_is_better else "lower"
        print(f"\nPaired by seed ({task.metric}, {better} is better; 95% t interval of the mean difference):\n")
        print("| pair | seeds | mean difference | 95% interval | |\n|---|---|---|---|---|")
        print("\n".join(lines))


def report(rows: list[dict[str, Any]], tie: float, tasks: list[str] | None, plots: Path | None) -> None:
    """Print the tables of ``tasks`` (fair-budget ones), or of the older tasks when None; draw their PNGs into
    ``plots`` unless it is None."""
    from .plots import plot, plot_fair

    if tasks:
        for task in [t for t in TASKS.values() if t.pairs]:
            if task.name in tasks:
                report_fair(rows, task, tie)
                if plots:
                    plot_fair(rows, task, plots)
        return
    rows = [r for r in rows if not TASKS[r["task"]].pairs]
    lines = [
        "| task | metric | AdamW (fused) | memopt_adamw | best lr AdamW / memopt | steps to target AdamW / memopt | memopt W/T/L | kappa=0 equals AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS.values():
        if task.pairs:
            continue
        lr_a, lr_m = best_lr(rows, task, "adamw"), best_lr(rows, task, "memopt")
        if lr_a is None or lr_m is None:
            continue
        a, m = runs_at(rows, task, "adamw", lr_a), runs_at(rows, task, "memopt", lr_m)
        fa, fm = [r["final"] for r in a], [r["final"] for r in m]
        # target: the worse optimizer's mean final value, relaxed (1 accuracy point, or 25% on a loss)
        # so that it is a level both can reach, not one half of the runs never do
        worse = (
            min(statistics.mean(fa), statistics.mean(fm)) - 0.01
            if task.higher_is_better
            else max(statistics.mean(fa), statistics.mean(fm)) * 1.25
        )
        sa = _steps_summary([_steps_to(r, worse, task.higher_is_better) for r in a])
        sm = _steps_summary([_steps_to(r, worse, task.higher_is_better) for r in m])
        wins, ties, losses = (sum(c) for c in zip(*(_win_tie_loss(rows, task, lr, tie) for lr in task.lrs)))
        k0 = runs_at(rows, task, "memopt_kappa0")
        sanity = "-"
        if k0:
            ref = next((r for r in runs_at(rows, task, "adamw", k0[0]["lr"]) if r["seed"] == k0[0]["seed"]), None)
            if ref is not None:
                sanity = "yes (exact)" if ref["curve"] == k0[0]["curve"] else f"NO: {ref['final']} vs {k0[0]['final']}"
        lines.append(
            f"| {task.name} | {task.metric} | {_fmt(fa)} | {_fmt(fm)} | {lr_a:g} / {lr_m:g} | {sa} / {sm} | {wins}/{ties}/{losses} | {sanity} |"
        )
    print("\n".join(lines))
    print(
        "\nEvery learning rate of the grid (final value, mean ± std over seeds; memopt W/T/L against AdamW, paired by seed):\n"
    )
    print("| task | lr | AdamW (fused) | memopt_adamw | memopt W/T/L |\n|---|---|---|---|---|")
    for task in [t for t in TASKS.values() if not t.pairs]:
        for lr in task.lrs:
            a, m = runs_at(rows, task, "adamw", lr), runs_at(rows, task, "memopt", lr)
            if not a and not m:
                continue
            w, t, lo = _win_tie_loss(rows, task, lr, tie)
            fa, fm = [r["final"] for r in a], [r["final"] for r in m]
            print(f"| {task.name} | {lr:g} | {_fmt(fa)} | {_fmt(fm)} | {w}/{t}/{lo} |")
    extra = sorted(
        {(r["task"], r["optimizer"], r["lr"]) for r in rows if r["lr"] not in TASKS[r["task"]].lrs and not r["memory"]}
    )
    if extra:
        print("\nOutside the grid (not part of the equal tuning budget; `run --lrs ... --optimizers ...`):\n")
        print("| task | optimizer | lr | final |\n|---|---|---|---|")
        for name, optimizer, lr in extra:
            finals = [r["final"] for r in runs_at(rows, TASKS[name], optimizer, lr)]
            print(f"| {name} | {optimizer} | {lr:g} | {_fmt(finals)} |")
    sens_tasks = list(dict.fromkeys(r["task"] for r in rows if r.get("sensitivity")))
    for name in sens_tasks:
        task = TASKS[name]
        sens = [r for r in rows if r.get("sensitivity") and r["task"] == name]
        lrs = sorted({r["lr"] for r in sens})
        print(f"\nSensitivity on {task.name} ({task.metric}) at lr={'/'.join(f'{x:g}' for x in lrs)}:\n")
        print("| topc \\ decay | 0.7 | 0.9 | 0.99 |\n|---|---|---|---|")
        for topc in (5, 10, 20):
            cells = []
            for decay in (0.7, 0.9, 0.99):
                vals = [r["final"] for r in sens if r["memory"] == {"topc": topc, "decay": decay}]
                cells.append(_fmt(vals))
            print(f"| {topc} | " + " | ".join(cells) + " |")
    if plots:
        plot(rows, plots)


def epoch_curves(epochs: list[dict[str, Any]], task: Task) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The runs of ``task`` among the epoch lines of a results file, each with its epochs in order."""
    runs: dict[str, tuple[dict[str, Any], dict[int, dict[str, Any]]]] = {}
    for e in epochs:
        run = e["epoch_of"]
        if run["task"] == task.name:
            runs.setdefault(json.dumps(run, sort_keys=True), (run, {}))[1][e["step"]] = e
    return [(run, [by_step[s] for s in sorted(by_step)]) for run, by_step in runs.values()]


def report_epochs(epochs: list[dict[str, Any]], task: Task) -> None:
    """Per run of ``task`` (finished or not), from its epoch lines: the minimum validation value and the test
    value at that epoch (the study's metric), and the minimum test value over epochs (the metric of the
    authors' script, which selects on the test set), then every epoch's values."""
    pick = max if task.higher_is_better else min
    print(f"\n**{task.name}**, {task.metric} after every epoch (runs finished or not):\n")
    print(
        "| optimizer | lr | (topc, decay) | seed | epochs done | best validation (epoch) | test at that epoch "
        "| best test over epochs (epoch), the paper's metric | seconds per epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    curves = epoch_curves(epochs, task)
    for run, rows in curves:
        per_epoch = task.eval_every
        best = pick(rows, key=lambda e: e["value"])
        test = f"{best['test']:.2f}" if "test" in best else "-"
        best_test = "-"
        if all("test" in e for e in rows):
            t = pick(rows, key=lambda e: e["test"])
            best_test = f"{t['test']:.2f} ({t['step'] // per_epoch})"
        print(
            f"| {run['optimizer']} | {run['lr']:g} | {knobs(run['memory'])} | {run['seed']} | {len(rows)} of "
            f"{run['steps'] // per_epoch} | {best['value']:.2f} ({best['step'] // per_epoch}) | {test} | {best_test} | "
            f"{rows[-1]['seconds'] / len(rows):.0f} |"
        )
    for run, rows in curves:
        print(f"\n{run['optimizer']} lr={run['lr']:g} {knobs(run['memory'])}, per epoch (validation / test):\n")
        print(", ".join(f"{e['value']:.1f}" + (f" / {e['test']:.1f}" if "test" in e else "") for e in rows))
