"""The study's PNGs: the mean curve of each optimizer at its best learning rate or trial."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .fair import fair_best, fair_runs
from .report import best_lr, epoch_curves, knobs, runs_at
from .tasks import TASKS, Task


def plot(rows, folder: Path) -> None:
    """One PNG per older task: AdamW and memopt_adamw at their best lr, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for task in [t for t in TASKS.values() if not t.pairs]:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for optimizer, label in (("adamw", "AdamW (fused)"), ("memopt", "memopt_adamw")):
            lr = best_lr(rows, task, optimizer)
            runs = runs_at(rows, task, optimizer, lr) if lr is not None else []
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=f"{label}, lr={lr:g}, {len(runs)} seeds")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(task.metric)
        if task.name == "logreg":
            ax.set_yscale("log")
        ax.set_title(task.name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{task.name}.png", dpi=100)
        plt.close(fig)


def plot_fair(rows, task: Task, folder: Path) -> None:
    """One PNG per recorded length of a fair-budget task: a panel per pair, the mean curve over the seeds of
    each optimizer's best trial (base solid, memopt dashed), named in the legend with its lr and knobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    lengths = sorted({r["steps"] for r in rows if r["task"] == task.name and "steps" in r})
    for steps in lengths:
        fig, axes = plt.subplots(1, len(task.pairs), figsize=(max(6.5, 5 * len(task.pairs)), 3.8), squeeze=False)
        for ax, pair in zip(axes[0], task.pairs):
            for optimizer, style in zip(pair, ("-", "--")):
                best = fair_best(rows, task, optimizer, steps)
                runs = fair_runs(rows, task, optimizer, steps, *best) if best else []
                if not runs:
                    continue
                x = [s for s, _ in runs[0]["curve"]]
                mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(x))]
                lr, memory = best
                label_knobs = f", {knobs(memory)}" if memory else ""
                ax.plot(
                    x,
                    mean,
                    style,
                    marker="o" if len(x) < 10 else None,
                    label=f"{optimizer}, lr={lr:g}{label_knobs}, n={len(runs)}",
                )
            ax.set_xlabel("step")
            ax.set_ylabel(task.metric)
            if not task.higher_is_better:
                ax.set_yscale("log")
            ax.set_title(f"{pair[0]} / {pair[1]}")
            ax.legend(fontsize=8)
        suffix = f"_{steps}" if len(lengths) > 1 else ""
        fig.suptitle(f"{task.name}, {steps} steps: each optimizer's best trial, mean over seeds", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / f"{task.name}{suffix}.png", dpi=100)
        plt.close(fig)


def plot_epochs(epochs: list[dict[str, Any]], task: Task, path: Path) -> None:
    """One PNG of every run of ``task`` in the epoch lines: validation (solid) and test (dotted) after each
    epoch, each run in its own colour, named with its optimizer, lr and knobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    with_test = False
    for run, rows in epoch_curves(epochs, task):
        x = [e["step"] // task.eval_every for e in rows]
        label = f"{run['optimizer']}, lr={run['lr']:g}" + (f", {knobs(run['memory'])}" if run["memory"] else "")
        (line,) = ax.plot(x, [e["value"] for e in rows], "-", marker="o", markersize=3, label=f"{label}: validation")
        if all("test" in e for e in rows):
            ax.plot(x, [e["test"] for e in rows], ":", color=line.get_color(), label=f"{label}: test")
            with_test = True
    ax.set_xlabel("epoch")
    # the task's metric names the validation split; with test curves beside it, the axis holds both
    ax.set_ylabel(task.metric.replace("validation ", "") + " (validation, test)" if with_test else task.metric)
    if not task.higher_is_better:
        ax.set_yscale("log")
    ax.set_title(f"{task.name}: after every epoch (seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
