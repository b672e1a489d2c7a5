"""End-to-end Trainer throughput: memopt_adamw against adamw_torch_fused on MiniLM.

    python benchmarks/trainer_throughput.py                      # 30 steps per run, batch 32, length 128
    python benchmarks/trainer_throughput.py --steps 60 --repeats 3
    python benchmarks/trainer_throughput.py --ballast 11            # + AdamW holding memopt's bytes
    python benchmarks/trainer_throughput.py --synthetic             # GPT-2-style LM from a config, random tokens

all-MiniLM-L6-v2 (22.7M parameters) fine-tuned on the SST-2 stand-in (SPEC section 7), the
optimizers alternating run by run (A B A B ...) so that drift in the machine's speed hits both.
Reports train samples per second from the Trainer's own metrics (median over repeats), and, from the
time between step ends, the first step (it allocates the optimizer state: ``topc`` + 1 parameter-sized
buffers for memopt, and first-touching that memory is slow on some VMs) apart from the steady-state
seconds per step (median of the steps after the first).

``--synthetic`` needs no archive: a 6-layer GPT-2-style causal LM (d=512, 25M parameters) built from
its config, trained on random tokens (what ``benchmarks/gpu_check.sh`` runs on a machine that reaches
nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_memopt  # noqa: F401  (registers optim="memopt_adamw")

# memopt_data, the examples' data layer, lives in examples/: a script run by path does not find it on its own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (from one step end to the next; the first from the train start)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--optim-args", default="topc=10,decay=0.7")
    ap.add_argument(
        "--ballast",
        type=int,
        default=0,
        help="also run AdamW holding this many parameter-sized fp32 tensors per parameter (11 = memopt's "
        "topc=10 slots + running sum): the same memory without the memory's algorithm",
    )
    ap.add_argument("--synthetic", action="store_true", help="a GPT-2-style LM from a config on random tokens")
    ap.add_argument("--layers", type=int, default=6, help="--synthetic: transformer layers")
    args = ap.parse_args(argv)

    if args.synthetic:
        ds, make_model, what = _synthetic(args)
    else:
        ds, make_model, what = _minilm(args)
    # label -> (optim, ballast tensors per parameter)
    configs = {"adamw_torch_fused": ("adamw_torch_fused", 0), "memopt_adamw": ("memopt_adamw", 0)}
    if args.ballast:
        configs[f"adamw_torch_fused + {args.ballast} tensors/param"] = ("adamw_torch_fused", args.ballast)
    runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in configs}  # samples/s, first, steady
    for _ in range(args.repeats):
        for label, (optim, ballast) in configs.items():
            torch.manual_seed(0)
            model = make_model()
            held = [torch.zeros_like(p) for p in model.parameters() for _ in range(ballast)]
            clock = StepClock()
            with tempfile.TemporaryDirectory() as out:
                targs = TrainingArguments(
                    output_dir=out,
                    optim=optim,
                    optim_args=args.optim_args if optim.startswith("memopt") else None,
                    per_device_train_batch_size=args.batch,
                    max_steps=args.steps,
                    learning_rate=5e-5,
                    report_to=[],
                    save_strategy="no",
                    logging_strategy="no",
                    disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available(),
                    dataloader_num_workers=0,
                )
                metrics = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[clock]).train().metrics
            del held
            run = (metrics["train_samples_per_second"], clock.seconds[0], statistics.median(clock.seconds[1:]))
            runs[label].append(run)
            print(
                f"  {label:<18} {run[0]:.2f} samples/s; first step {run[1]:.2f} s, then {run[2]:.3f} s/step", flush=True
            )
    med = {label: [statistics.median(column) for column in zip(*values)] for label, values in runs.items()}
    base = med["adamw_torch_fused"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{what}, batch {args.batch} x {args.length} tokens, {args.steps} steps, {device}")
    print(
        "| optim | samples/s (median) | relative | first step (s) | steady s/step (median) | relative |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for label, (rate, first, step) in med.items():
        print(f"| {label} | {rate:.2f} | {rate / base[0]:.3f} | {first:.2f} | {step:.3f} | {step / base[2]:.3f} |")


def _minilm(args):
    from memopt_data import load_sst2_standin, minilm_model_dir

    path = minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_sst2_standin()["train"].select(range(args.steps * args.batch))
    ds = ds.map(
        lambda b: tok(b["sentence"], truncation=True, max_length=args.length, padding="max_length"),
        batched=True,
        remove_columns=["sentence", "idx", "rating"],
    )
    return ds, lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), "MiniLM"


class _Tokens(torch.utils.data.Dataset):
    """Rows of token ids as causal-LM examples (a torch dataset: the GPU machines have no ``datasets``)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _synthetic(args):
    config = GPT2Config(vocab_size=8192, n_positions=args.length, n_embd=512, n_layer=args.layers, n_head=8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.steps * args.batch, args.length), generator=gen)
    ds = _Tokens(ids)
    n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    return ds, lambda: GPT2LMHeadModel(config), f"GPT-2-style LM from a config ({n / 1e6:.1f}M parameters)"


if __name__ == "__main__":
    main()
