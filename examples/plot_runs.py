#!/usr/bin/env python
"""Plot the training loss and evaluation metrics of several Trainer runs into one PNG, one line per run.

Reads ``trainer_state.json`` from each output folder (or from its latest ``checkpoint-*``), plus the final
``eval_results.json`` when the run evaluated once more after training::

    python examples/plot_runs.py runs/sst2-memopt runs/sst2-adamw --labels memopt_adamw adamw -o sst2.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402

# Evaluation keys that describe speed or position, not quality.
_NOT_METRICS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_samples", "epoch", "step"}


def _state_file(run_dir: Path) -> Path:
    state = run_dir / "trainer_state.json"
    if state.exists():
        return state
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if checkpoints and (checkpoints[-1] / "trainer_state.json").exists():
        return checkpoints[-1] / "trainer_state.json"
    raise FileNotFoundError(f"{run_dir}: no trainer_state.json (run with --do_train, or point at a checkpoint)")


def load_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, value), ...], "eval_loss": [...], "eval_accuracy": [...], ...}`` of one run.

    Training loss comes from the logging steps; evaluation metrics from evaluations during training and, if
    ``eval_results.json`` exists, the final evaluation at the last step.
    """
    run_dir = Path(run_dir)
    state = json.loads(_state_file(run_dir).read_text())
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in state.get("log_history", []):
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            is_eval = key.startswith("eval_") and key not in _NOT_METRICS
            if (key == "loss" or is_eval) and isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(key, []).append((int(step), float(value)))
    final = run_dir / "eval_results.json"
    if final.exists():
        step = int(state.get("global_step", 0))
        for key, value in json.loads(final.read_text()).items():
            if key.startswith("eval_") and key not in _NOT_METRICS and isinstance(value, (int, float)):
                points = curves.setdefault(key, [])
                if not points or points[-1][0] != step:
                    points.append((step, float(value)))
    return curves


def plot_runs(
    run_dirs: list[str | Path], output: str | Path, labels: list[str] | None = None, title: str | None = None
) -> Path:
    """Write one PNG with a panel per quantity (training loss first) and a line per run; returns its path."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    labels = labels or [Path(d).name for d in run_dirs]
    runs = [(label, load_curves(d)) for label, d in zip(labels, run_dirs)]
    keys: list[str] = []
    for _, curves in runs:
        keys += [k for k in curves if k not in keys]
    if not keys:
        raise ValueError("no loss or evaluation metric logged in any run (set --logging_steps / --eval_strategy)")
    keys.sort(key=lambda k: (k != "loss", k != "eval_loss", k))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, curves in runs:
            points = curves.get(key)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_title("training loss" if key == "loss" else key.removeprefix("eval_").replace("_", " ") + " (eval)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="Trainer output folders")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: folder names)")
    parser.add_argument("-o", "--output", default="runs.png", help="PNG to write (default: runs.png)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    path = plot_runs(args.run_dirs, args.output, args.labels, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
