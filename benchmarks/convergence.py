"""Convergence study: memopt_adamw against torch's fused AdamW under the same tuning budget.

Run it in pieces (each run appends one JSON line to ``--out``), then report:

    python benchmarks/convergence.py run --task logreg            # ~1 min
    python benchmarks/convergence.py run --task lm                # tiny Llama from scratch on Shakespeare
    python benchmarks/convergence.py run --task sst2              # MiniLM on the SST-2 stand-in
    python benchmarks/convergence.py run --task snli              # MiniLM on the SNLI subset
    python benchmarks/convergence.py sensitivity --task lm        # topc x decay grid at the best lr
    python benchmarks/convergence.py stats --task lm --lr 3e-4    # memory_stats() along one memopt run
    python benchmarks/convergence.py report                       # tables (markdown) + one PNG per task

Tasks (all offline; see SPEC section 7 for the data):
- ``sst2``: all-MiniLM-L6-v2 fine-tuned on the Rotten-Tomatoes sentences SST-2 was built from; accuracy.
- ``snli``: the same model on SNLI pairs (3 labels); accuracy.
- ``lm``: a 4-layer Llama trained from scratch on bytes of Shakespeare, whole works held out; validation loss.
- ``logreg``: the paper's convex check, L2-regularised logistic regression (scikit-learn's breast-cancer
  data, standardised), minibatch; suboptimality of the training objective against an L-BFGS optimum.

Each task has a learning-rate grid of 3 and 3 seeds for each optimizer; a seed fixes the model's
initialisation, the data order and dropout, identically for both optimizers. ``memopt_kappa0`` (the
memory off, torch's fused kernel) is a sanity row: it must equal ``adamw`` exactly.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hf_memopt

OUT = Path("runs/convergence.jsonl")


@dataclass
class Task:
    name: str
    lrs: tuple[float, ...]
    steps: int
    eval_every: int
    higher_is_better: bool
    metric: str
    build: Callable[[int], tuple[torch.nn.Module, Callable[[int], float], Callable[[], float]]]


# -- tasks: build(seed) -> (model, train_step(step) -> loss, evaluate() -> metric) --------------


def _loop(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], loss_fn, evaluate):
    def train_step(_step: int) -> torch.Tensor:
        model.train()
        return loss_fn(model, next(batches))

    return model, train_step, evaluate


def _cycle(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def build_logreg(seed: int):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    lam = 1e-2
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)

    def objective(m: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = m(xb).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, yb) + 0.5 * lam * m.weight.pow(2).sum()

    best = _logreg_optimum(x, y, lam)
    gen = torch.Generator().manual_seed(seed)
    order = _cycle(len(x), 32, gen)
    batches = ({"x": x[idx], "y": y[idx]} for idx in order)

    @torch.no_grad()
    def evaluate() -> float:
        return max(objective(model, x, y).item() - best, 1e-12)

    return _loop(model, batches, lambda m, b: objective(m, b["x"], b["y"]), evaluate)


def _logreg_optimum(x: torch.Tensor, y: torch.Tensor, lam: float) -> float:
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    xd, yd = x.double(), y.double()
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50)

    def closure():
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(xd @ w[:-1] + w[-1], yd)
            + 0.5 * lam * w[:-1].pow(2).sum()
        )
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return closure().item()


def build_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_memopt.data import load_shakespeare

    ds = load_shakespeare()
    block, batch = 128, 16

    def encode(split: str) -> torch.Tensor:
        text = "\n\n".join(ds[split]["text"])
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    train, val = encode("train"), encode("validation")
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=block,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            starts = torch.randint(0, len(train) - block - 1, (batch,), generator=gen)
            yield {"input_ids": torch.stack([train[s : s + block] for s in starts])}

    val_starts = torch.linspace(0, len(val) - block - 1, 64).long()
    val_ids = torch.stack([val[s : s + block] for s in val_starts])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in val_ids.split(16)]
        return sum(losses) / len(losses)

    return _loop(model, batches(), lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, evaluate)


def _build_minilm(seed: int, dataset: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_memopt.data import load_snli_standin, load_sst2_standin, minilm_model_dir

    path = minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    if dataset == "sst2":
        ds, num_labels, columns = load_sst2_standin(), 2, ("sentence",)
    else:
        ds, num_labels, columns = load_snli_standin(), 3, ("premise", "hypothesis")

    def enc(split: str) -> dict[str, torch.Tensor]:
        texts = [list(ds[split][c]) for c in columns]  # datasets>=4 returns a Column
        return tok(*texts, truncation=True, max_length=64, padding="max_length", return_tensors="pt")

    n_train, n_eval = 6000, 600
    ds = ds.shuffle(seed=0)
    ds["train"] = ds["train"].select(range(min(n_train, len(ds["train"]))))
    ds["validation"] = ds["validation"].select(range(min(n_eval, len(ds["validation"]))))
    train, val = enc("train"), enc("validation")
    y_train = torch.tensor(list(ds["train"]["label"]))
    y_val = torch.tensor(list(ds["validation"]["label"]))
    torch.manual_seed(seed)  # the classifier head's initialisation and dropout
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    gen = torch.Generator().manual_seed(seed)
    order = _cycle(len(y_train), 16, gen)
    batches = ({**{k: v[idx] for k, v in train.items()}, "labels": y_train[idx]} for idx in order)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        correct = 0
        for i in range(0, len(y_val), 100):
            logits = model(**{k: v[i : i + 100] for k, v in val.items()}).logits
            correct += (logits.argmax(-1) == y_val[i : i + 100]).sum().item()
        return correct / len(y_val)

    return _loop(model, batches, lambda m, b: m(**b).loss, evaluate)


TASKS = {
    "logreg": Task("logreg", (1e-3, 1e-2, 1e-1), 400, 20, False, "objective - optimum", build_logreg),
    "lm": Task("lm", (3e-4, 1e-3, 3e-3), 300, 25, False, "validation loss (nats/byte)", build_lm),
    "sst2": Task("sst2", (2e-5, 5e-5, 1e-4), 150, 25, True, "accuracy", lambda s: _build_minilm(s, "sst2")),
    "snli": Task("snli", (2e-5, 5e-5, 1e-4), 150, 25, True, "accuracy", lambda s: _build_minilm(s, "snli")),
}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True),
    "memopt": lambda params, lr, **kw: hf_memopt.MemoryAugmentedAdamW(params, lr=lr, weight_decay=0.01, **kw),
    "memopt_kappa0": lambda params, lr, **kw: hf_memopt.MemoryAugmentedAdamW(
        params, lr=lr, weight_decay=0.01, kappa=0.0, fused=True
    ),
}


@functools.cache
def code_version() -> str:
    """HEAD commit plus a digest of the hf_memopt sources as they are on disk (the tree may be dirty)."""
    import hashlib
    import subprocess

    root = Path(hf_memopt.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".c") and f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "?"
    return f"{head}+src:{h.hexdigest()[:12]}"


def train_once(
    task: Task,
    optimizer: str,
    lr: float,
    seed: int,
    memory: dict[str, Any],
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    model, train_step, evaluate = task.build(seed)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr, **memory)
    warmup = max(1, task.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (task.steps - s) / (task.steps - warmup)))
    )
    curve = [(0, evaluate())]
    losses = []
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, task.steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = train_step(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as Trainer does (max_grad_norm=1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, opt)
        if step % task.eval_every == 0 or step == task.steps:
            curve.append((step, evaluate()))
    return dict(
        task=task.name,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        memory=memory,
        curve=curve,
        train_loss=losses,
        final=curve[-1][1],
        seconds=time.perf_counter() - t0,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        code=code_version(),
    )


def append(out: Path, row: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def load_rows(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def done(rows, task, optimizer, lr, seed, memory) -> bool:
    return any(
        r["task"] == task
        and r["optimizer"] == optimizer
        and r["lr"] == lr
        and r["seed"] == seed
        and r["memory"] == memory
        for r in rows
    )


def _past(stop_at: str | None) -> bool:
    """Whether the UTC wall clock is past ``stop_at`` (HH:MM, today)."""
    if not stop_at:
        return False
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    hh, mm = (int(x) for x in stop_at.split(":"))
    return (now.hour, now.minute) >= (hh, mm)


def cmd_run(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    rows = load_rows(args.out)
    lrs = args.lrs or task.lrs
    jobs = [(o, lr, s) for lr in lrs for s in args.seeds for o in args.optimizers]
    if not args.lrs:  # the sanity row belongs to the grid
        jobs.append(("memopt_kappa0", lrs[len(lrs) // 2], args.seeds[0]))
    for optimizer, lr, seed in jobs:
        if done(rows, task.name, optimizer, lr, seed, {}):
            continue
        if _past(args.stop_at):
            print(f"--stop-at {args.stop_at} UTC reached: not starting {task.name} {optimizer} lr={lr:g} seed={seed}")
            return
        row = train_once(task, optimizer, lr, seed, {})
        append(args.out, row)
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
    for topc in (5, 10, 20):
        for decay in (0.7, 0.9, 0.99):
            memory = {"topc": topc, "decay": decay}
            for seed in args.seeds:
                if done(rows, task.name, "memopt", lr, seed, memory):
                    continue
                row = train_once(task, "memopt", lr, seed, memory)
                row["sensitivity"] = True
                append(args.out, row)
                print(f"{task.name} topc={topc} decay={decay} seed={seed}: {row['final']:.4g}", flush=True)


# -- report ------------------------------------------------------------------------------


def _runs(rows, task, optimizer, lr=None, memory=None):
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
    means = {}
    for lr in task.lrs:
        runs = _runs(rows, task, optimizer, lr)
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
    memopt = {r["seed"]: r for r in _runs(rows, task, "memopt", lr)}
    for ra in _runs(rows, task, "adamw", lr):
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


def cmd_report(args: argparse.Namespace) -> None:
    rows = load_rows(args.out)
    lines = [
        "| task | metric | AdamW (fused) | memopt_adamw | best lr AdamW / memopt | steps to target AdamW / memopt | memopt W/T/L | kappa=0 equals AdamW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS.values():
        lr_a, lr_m = best_lr(rows, task, "adamw"), best_lr(rows, task, "memopt")
        if lr_a is None or lr_m is None:
            continue
        a, m = _runs(rows, task, "adamw", lr_a), _runs(rows, task, "memopt", lr_m)
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
        wins, ties, losses = (sum(c) for c in zip(*(_win_tie_loss(rows, task, lr, args.tie) for lr in task.lrs)))
        k0 = _runs(rows, task, "memopt_kappa0")
        sanity = "-"
        if k0:
            ref = next((r for r in _runs(rows, task, "adamw", k0[0]["lr"]) if r["seed"] == k0[0]["seed"]), None)
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
    for task in TASKS.values():
        for lr in task.lrs:
            a, m = _runs(rows, task, "adamw", lr), _runs(rows, task, "memopt", lr)
            if not a and not m:
                continue
            w, t, lo = _win_tie_loss(rows, task, lr, args.tie)
            fa, fm = [r["final"] for r in a], [r["final"] for r in m]
            print(f"| {task.name} | {lr:g} | {_fmt(fa)} | {_fmt(fm)} | {w}/{t}/{lo} |")
    extra = sorted(
        {(r["task"], r["optimizer"], r["lr"]) for r in rows if r["lr"] not in TASKS[r["task"]].lrs and not r["memory"]}
    )
    if extra:
        print("\nOutside the grid (not part of the equal tuning budget; `run --lrs ... --optimizers ...`):\n")
        print("| task | optimizer | lr | final |\n|---|---|---|---|")
        for name, optimizer, lr in extra:
            finals = [r["final"] for r in _runs(rows, TASKS[name], optimizer, lr)]
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
    if args.plots:
        plot(rows, Path(args.plots))


def plot(rows, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS.values():
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for optimizer, label in (("adamw", "AdamW (fused)"), ("memopt", "memopt_adamw")):
            lr = best_lr(rows, task, optimizer)
            runs = _runs(rows, task, optimizer, lr) if lr is not None else []
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="JSON-lines file the runs are appended to")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--task", choices=sorted(TASKS), required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--lrs", type=float, nargs="+")
    run.add_argument("--optimizers", nargs="+", default=["adamw", "memopt"], choices=["adamw", "memopt"])
    run.add_argument("--stop-at", help="UTC HH:MM after which no further run is started (the one in flight finishes)")
    sens = sub.add_parser("sensitivity")
    sens.add_argument("--task", choices=sorted(TASKS), default="lm")
    sens.add_argument("--seeds", type=int, nargs="+", default=[0])
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
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    {"run": cmd_run, "sensitivity": cmd_sensitivity, "stats": cmd_stats, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
