"""Optimizer-state bytes per rank, measured, against ``hf_memopt.estimate_memory``.

For AdamW and MemoryAugmentedAdamW (C=5, fp32 and bf16 memory), on 1 and 2 gloo ranks (CPU),
under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3: builds a ~1M-parameter MLP, takes one step,
sums the local bytes of every tensor in ``optimizer.state`` (DeepSpeed: its client
optimizer's) and prints them next to the estimate. Exits 1 if any differs by more than 5%.

    DS_ACCELERATOR=cpu python benchmarks/sharded_memory.py
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import warnings
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

TOPC = 5
WIDTH, DEPTH = 512, 4
STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")
OPTIMIZERS = (("adamw", None), ("memopt", "fp32"), ("memopt", "bf16"))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def make_optimizer(kind: str, buffer_dtype: str | None, params: Any) -> torch.optim.Optimizer:
    from hf_memopt import MemoryAugmentedAdamW

    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=False)
    return MemoryAugmentedAdamW(params, lr=1e-3, topc=TOPC, buffer_dtype=buffer_dtype)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for entry in opt.state.values():
        for v in entry.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def measure(strategy: str, kind: str, buffer_dtype: str | None, rank: int) -> int:
    model = make_model()
    x = torch.randn(4, WIDTH)
    if strategy == "ddp":
        opt = make_optimizer(kind, buffer_dtype, model.parameters())
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if dist.get_world_size() > 1 else model
        wrapped(x).square().mean().backward()
        opt.step()
        return state_bytes(opt)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        opt = make_optimizer(kind, buffer_dtype, model.parameters())
        model(x).square().mean().backward()
        opt.step()
        return state_bytes(opt)
    import deepspeed

    stage = int(strategy[-1])
    opt = make_optimizer(kind, buffer_dtype, model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if kind == "memopt":
        from hf_memopt.distributed import deepspeed as ds_adapter

        ds_adapter.bind(engine)
    engine.backward(engine(x).square().mean())
    engine.step()
    return state_bytes(engine.optimizer.optimizer)


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # DeepSpeed's and torch's deprecation chatter would bury the table
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = {(s, k, b): measure(s, k, b, rank) for s in STRATEGIES for k, b in OPTIMIZERS}
        torch.save(rows, f"{out}/rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    from hf_memopt.estimate import estimate_memory

    numel = sum(p.numel() for p in make_model().parameters())
    print(f"model: {DEPTH} x Linear({WIDTH}, {WIDTH}) = {numel:,} fp32 parameters; memory C={TOPC}")
    print("optimizer state per rank = tensors in optimizer.state (moments, memory slots, running sum)\n")
    header = f"{'ranks':>5} {'strategy':>8} {'optimizer':>12} {'measured MiB':>13} {'estimate MiB':>13} {'B/param':>8} {'diff':>7}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for world_size in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(worker, args=(world_size, free_port(), out), nprocs=world_size, start_method="spawn")
            rows = torch.load(f"{out}/rank0.pt")
        for (strategy, kind, buf), measured in rows.items():
            est = estimate_memory(numel, topc=TOPC, buffer_dtype=buf, world_size=world_size, sharded=strategy)
            expected = est["adamw" if kind == "adamw" else "memopt"]
            diff = measured / expected - 1
            worst = max(worst, abs(diff))
            label = kind if buf is None else f"{kind}-{buf}"
            print(
                f"{world_size:>5} {strategy:>8} {label:>12} {measured / 2**20:>13.2f} {expected / 2**20:>13.2f} "
                f"{measured / numel:>8.2f} {diff:>+7.1%}"
            )
    print(f"\nlargest difference from estimate_memory: {worst:.2%}")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
