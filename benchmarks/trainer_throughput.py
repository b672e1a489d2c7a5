"""End-to-end Trainer throughput: memopt_adamw against adamw_torch_fused on MiniLM.

    python benchmarks/trainer_throughput.py                      # 30 steps per run, batch 32, length 128
    python benchmarks/trainer_throughput.py --steps 60 --repeats 3

all-MiniLM-L6-v2 (22.7M parameters) fine-tuned on the SST-2 stand-in (SPEC section 7), the
optimizers alternating run by run (A B A B ...) so that drift in the machine's speed hits both.
Reports train samples per second from the Trainer's own metrics (median over repeats).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import hf_memopt  # noqa: F401  (registers optim="memopt_adamw")
from hf_memopt.data import load_sst2_standin, minilm_model_dir


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
    for _ in range(args.repeats):
        for optim in results:
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
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
                metrics = Trainer(model=model, args=targs, train_dataset=ds).train().metrics
            results[optim].append(metrics["train_samples_per_second"])
            print(f"  {optim:<18} {metrics['train_samples_per_second']:.2f} samples/s", flush=True)
    base = statistics.median(results["adamw_torch_fused"])
    print(f"\nMiniLM, batch {args.batch} x {args.length} tokens, {args.steps} steps, {torch.get_num_threads()} threads")
    print("| optim | samples/s (median) | relative |\n|---|---:|---:|")
    for optim, values in results.items():
        med = statistics.median(values)
        print(f"| {optim} | {med:.2f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
