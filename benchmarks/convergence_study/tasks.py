"""The convergence study's tasks: each ``build(seed)`` gives a model, a resumable training step and an evaluation.

A task's data stream is fixed by its seed, so a run stopped after ``n`` steps continues exactly by building the
task again and drawing (not training on) the first ``n`` batches (:meth:`BatchLoop.skip`); this is the data
position a checkpoint restores (:mod:`convergence_study.checkpoints`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Task:
    """One problem of the study: its model and data (``build``), length, evaluation and tuning grid."""

    name: str
    lrs: tuple[float, ...]
    steps: int
    eval_every: int
    higher_is_better: bool
    metric: str
    build: Callable[[int], tuple[torch.nn.Module, TrainStep, Callable[[], float | dict[str, float]]]]
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
    # whether one evaluation interval is one pass over the training data (PTB): then each evaluation is also
    # written to the results file as it finishes (a long run's completed epochs survive a stop)
    eval_is_epoch: bool = False


class TrainStep(Protocol):
    """One training step of a task, ``step`` counting from 1, returning the loss (backward is the caller's)."""

    def __call__(self, step: int) -> torch.Tensor: ...

    def skip(self, steps: int) -> None:
        """Advance the data stream past the first ``steps`` steps without training (a resumed run)."""


# -- tasks: build(seed) -> (model, train_step, evaluate() -> metric) ------------------------------


class BatchLoop:
    """A training step that draws the next batch of a seeded stream: the stream's position is the step count."""

    def __init__(self, model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], loss_fn) -> None:
        self.model, self.batches, self.loss_fn = model, batches, loss_fn

    def __call__(self, step: int) -> torch.Tensor:
        self.model.train()
        return self.loss_fn(self.model, next(self.batches))

    def skip(self, steps: int) -> None:
        for _ in range(steps):
            next(self.batches)


def _loop(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], loss_fn, evaluate):
    return model, BatchLoop(model, batches, loss_fn), evaluate


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

    from memopt_data import load_shakespeare

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

    from memopt_data import load_snli_standin, load_sst2_standin, minilm_model_dir

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
    from memopt_data.ptb import batchify, load_ptb

    ids, vocab = load_ptb()
    return (
        len(vocab),
        batchify(ids["train"], PTB_BATCH),
        batchify(ids["valid"], PTB_EVAL_BATCH),
        batchify(ids["test"], PTB_EVAL_BATCH),
    )


class _PTBStep:
    """Truncated BPTT over the epoch's chunks in order; the hidden state carries over within an epoch."""

    def __init__(self, model: LSTMLM, chunks: list[tuple[torch.Tensor, torch.Tensor]], nvocab: int) -> None:
        self.model, self.chunks, self.nvocab = model, chunks, nvocab
        self.h: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, step: int) -> torch.Tensor:
        self.model.train()
        i = (step - 1) % len(self.chunks)
        if i == 0:
            self.h = None  # a new epoch starts from a zero state, as the PyTorch example does
        x, y = self.chunks[i]
        h = None if self.h is None else tuple(t.detach() for t in self.h)
        logits, self.h = self.model(x, h)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.nvocab), y.reshape(-1))

    def skip(self, steps: int) -> None:
        # The chunk is chosen by the step number; only the hidden state is not replayed, so a run resumes at an
        # epoch boundary, where it is reset anyway.
        if steps % len(self.chunks):
            raise ValueError(
                f"a PTB run resumes only at an epoch boundary (a multiple of {len(self.chunks)} steps); got {steps}"
            )
        self.h = None


def ptb_steps_per_epoch() -> int:
    rows = 929_589 // PTB_BATCH  # train tokens of Mikolov's PTB incl. <eos> (checked in build_ptb)
    return math.ceil((rows - 1) / PTB_BPTT)


def build_ptb(seed: int):
    from memopt_data.ptb import bptt_chunks

    nvocab, train, valid, test = _ptb_cached()
    chunks = bptt_chunks(train, PTB_BPTT)
    assert len(chunks) == ptb_steps_per_epoch(), (len(chunks), ptb_steps_per_epoch())
    torch.manual_seed(seed)
    model = LSTMLM(nvocab)
    train_step = _PTBStep(model, chunks, nvocab)

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
        eval_is_epoch=True,
    ),
}
