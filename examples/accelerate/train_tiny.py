"""Train a tiny MLP with MemoryAugmentedAdamW under ``accelerate launch`` (any config in this folder).

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train_tiny.py

Each launched process runs this file: it must import hf_memopt itself. Prints one line per
rank at the end, with the loss and the memory's statistics.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from hf_memopt import MemoryAugmentedAdamW
from hf_memopt.distributed import deepspeed as memopt_deepspeed
from hf_memopt.distributed import shutdown_process_group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--buffer-dtype", default="bf16")
    args = parser.parse_args()

    # Without a GPU: cpu=True makes accelerate join the launched processes with gloo (DDP). DeepSpeed
    # must not get cpu=True (accelerate would drop it) but needs the gloo backend named, else accelerate
    # counts one process; DS_ACCELERATOR=cpu then runs DeepSpeed on CPU.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not torch.cuda.is_available() else []
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed, kwargs_handlers=handlers)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = MemoryAugmentedAdamW(model.parameters(), lr=1e-2, topc=4, buffer_dtype=args.buffer_dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * args.steps * accelerator.num_processes, 16, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # DeepSpeed takes its micro-batch size from here
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if accelerator.state.deepspeed_plugin is not None:
        # exact per-tensor priorities inside DeepSpeed's flat partitions (Trainer does this by itself)
        memopt_deepspeed.bind(model)

    loss = torch.tensor(float("nan"))
    for inputs, targets in loader:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    inner = optimizer.optimizer
    client = getattr(inner, "optimizer", inner)  # DeepSpeed: its ZeRO optimizer wraps ours
    stats = client.memory_stats()
    print(
        f"rank {accelerator.process_index}/{accelerator.num_processes} {accelerator.distributed_type}: "
        f"loss {loss.item():.4f} fill {stats['fill']:.2f} memory_bytes {stats['memory_bytes']}",
        flush=True,
    )
    if not torch.isfinite(loss):
        raise SystemExit("loss is not finite")
    accelerator.wait_for_everyone()
    # before end_training, which would destroy the group without the pause gloo needs (see its docstring)
    shutdown_process_group()
    accelerator.end_training()


if __name__ == "__main__":
    main()
