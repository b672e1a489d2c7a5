"""Running one trial of the study: build the task, train with one optimizer, record the curve.

With a checkpoint path, :func:`train_once` saves its whole state after each evaluation and, started again with
the same arguments, continues from the last one: the resumed run's curve, losses and final value are the ones
an uninterrupted run gives (tests/test_convergence_study.py checks it bit for bit).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hf_memopt

from . import checkpoints
from .store import run_key
from .tasks import Task

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True),
    "memopt": lambda params, lr, **kw: hf_memopt.MemoryAugmentedAdamW(params, lr=lr, weight_decay=0.01, **kw),
    "memopt_kappa0": lambda params, lr, **kw: hf_memopt.MemoryAugmentedAdamW(
        params, lr=lr, weight_decay=0.01, kappa=0.0, fused=True
    ),
    "adam": lambda params, lr, **kw: torch.optim.Adam(params, lr=lr),
    "memopt_adam": lambda params, lr, **kw: hf_memopt.MemoryAugmentedAdam(params, lr=lr, **kw),
    "sgd": lambda params, lr, **kw: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "memopt_sgd": lambda params, lr, **kw: hf_memopt.MemoryAugmentedSGD(params, lr=lr, momentum=0.9, **kw),
    "memopt_adamw_cm": lambda params, lr, **kw: hf_memopt.CriticalMomentaAdamW(params, lr=lr, weight_decay=0.01, **kw),
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
    steps: int | None = None,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``task`` for ``steps`` (its own length by default) with ``optimizer`` and return the result row.

    Args:
        on_step: called after every optimizer step (``memory_stats()`` along a run).
        checkpoint: file to save the run's state to after each evaluation and to resume from when it exists
            (it is the caller's to delete once the row is recorded). None: no checkpoints.
        on_epoch: called with ``{"step", "value", ...side metrics, "seconds"}`` after each evaluation of a task
            whose evaluation interval is an epoch (the caller records it).
    """
    steps = steps or task.steps
    key = run_key(task.name, optimizer, lr, seed, memory, steps)
    model, train_step, evaluate = task.build(seed)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr, **memory)
    sched = None
    if task.schedule:
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
        )
    side: list[tuple[int, dict[str, float]]] = []

    def measure(step: int) -> tuple[int, float]:
        value = evaluate()
        if isinstance(value, dict):  # the metric plus side metrics (PTB: test perplexity at each epoch)
            side.append((step, {k: v for k, v in value.items() if k != "value"}))
            value = value["value"]
        return step, value

    saved = checkpoints.load(checkpoint, key) if checkpoint is not None else None
    resumed_at: list[int] = []
    codes = [code_version()]
    if saved is None:
        curve = [measure(0)]
        losses: list[float] = []
        start, seconds = 0, 0.0
        torch.manual_seed(seed)
    else:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        start, seconds = saved["step"], saved["seconds"]
        curve, losses, side[:] = saved["curve"], saved["train_loss"], saved["side"]
        resumed_at = [*saved["resumed_at"], start]
        codes = list(dict.fromkeys([*saved["codes"], code_version()]))
        train_step.skip(start)  # the data position: the stream drawn up to the step the checkpoint was taken at
        torch.set_rng_state(saved["rng"])  # last, as building the task reseeded the generator
    t0 = time.perf_counter()
    for step in range(start + 1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = train_step(step)
        loss.backward()
        if task.clip is not None:  # the transformer tasks: 1.0, as Trainer does (max_grad_norm=1.0)
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, opt)
        if step % task.eval_every == 0 or step == steps:
            curve.append(measure(step))
            elapsed = seconds + time.perf_counter() - t0
            if on_epoch is not None and task.eval_is_epoch:
                extra = side[-1][1] if side and side[-1][0] == step else {}
                on_epoch({"step": step, "value": curve[-1][1], **extra, "seconds": elapsed})
            if checkpoint is not None and step < steps:
                pause = time.perf_counter()
                checkpoints.save(
                    checkpoint,
                    key,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "step": step,
                        "seconds": elapsed,
                        "curve": curve,
                        "train_loss": losses,
                        "side": side,
                        "resumed_at": resumed_at,
                        "codes": codes,
                        "rng": torch.get_rng_state(),
                    },
                )
                t0 += time.perf_counter() - pause  # training time only, not the writing of checkpoints
    row = dict(
        task=task.name,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        memory=memory,
        curve=curve,
        train_loss=losses,
        final=curve[-1][1],
        seconds=seconds + time.perf_counter() - t0,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        code=codes[0],
    )
    if resumed_at:  # continued from checkpoints at these steps, possibly under newer code
        row["resumed_at"] = resumed_at
        if len(codes) > 1:
            row["codes"] = codes
    if task.pairs:
        row["steps"] = steps
    if task.final == "best":
        pick = max if task.higher_is_better else min
        at = pick(range(1, len(curve)), key=lambda i: curve[i][1])
        row["final"], row["best_step"] = curve[at][1], curve[at][0]
        if side:
            row["side"] = side
            row["test_at_best"] = side[at][1].get("test")
    return row
