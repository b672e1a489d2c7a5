"""End-to-end Trainer throughput: memopt_adamw against adamw_torch_fused on MiniLM.

    python benchmarks/trainer_throughput.py                      # 30 steps per run, batch 32, length 128
    python benchmarks/trainer_throughput.py --steps 60 --repeats 3

all-MiniLM-L6-v2 (22.7M parameters) fine-tuned on the SST-2 stand-in (SPEC section 7), the
optimizers alternating run by run (A B A B ...) so that drift in the machine's speed hits both.
Reports train samples per second from the Trainer's own metrics (median over repeats), and, from the
time between step ends, the first step (it allocates the optimizer state: ``topc`` + 1 parameter-sized
buffers for memopt, and first-touching that memory is slow on some VMs) apart from the steady-state
seconds per step (median of the steps after the first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import hf_memopt  # noqa: F401  (registers optim="memopt_adamw")
from hf_memopt.data import load_sst2_standin, minilm_model_dir


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
    args = ap.parse_args(argv)

    path = minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_sst2_standin()["train"].select(range(args.steps * args.batch))
    ds = ds.map(
        lambda b: tok(b["sentence"], truncation=True, max_length=args.length, padding="max_length"),
        batched=True,
        remove_columns=["sentence", "idx", "rating"],
    )
    results: dict[str, list[float]] = {"adamw_torch_fused": [], "memopt_adamw": []}
    first: dict[str, list[float]] = {k: [] for k in results}
    steady: dict[str, list[float]] = {k: [] for k in results}
    for _ in range(args.repeats):
        for optim in results:
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
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
            results[optim].append(metrics["train_samples_per_second"])
            first[optim].append(clock.seconds[0])
            steady[optim].append(statistics.median(clock.seconds[1:]))
            print(
                f"  {optim:<18} {metrics['train_samples_per_second']:.2f} samples/s; first step {clock.seconds[0]:.2f} s, "
                f"then {steady[optim][-1]:.3f} s/step",
                flush=True,
            )
    base = statistics.median(results["adamw_torch_fused"])
    base_step = statistics.median(steady["adamw_torch_fused"])
    print(f"\nMiniLM, batch {args.batch} x {args.length} tokens, {args.steps} steps, {torch.get_num_threads()} threads")
    print(
        "| optim | samples/s (median) | relative | first step (s) | steady s/step (median) | relative |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for optim, values in results.items():
        med, step = statistics.median(values), statistics.median(steady[optim])
        print(
            f"| {optim} | {med:.2f} | {med / base:.3f} | {statistics.median(first[optim]):.2f} | {step:.3f} | "
            f"{step / base_step:.3f} |"
        )


if __name__ == "__main__":
    main()
