"""Spawn a few gloo processes on localhost for the multi-process tests.

``run(fn, world_size, *args)`` starts ``world_size`` processes (``torch.multiprocessing``
spawn), initialises a gloo process group on 127.0.0.1 and a free port in each, calls
``fn(rank, world_size, *args)`` (a module-level function, so spawn can import it), then
``barrier()`` and ``destroy_process_group()``, and exits at once (``os._exit``). Each rank's
return value comes back through a ``torch.save``d file; a rank's exception fails the call with
that rank's traceback.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    # The rank's work is done and its result written. Leave without the interpreter's shutdown: with
    # torch 2.13, a gloo worker thread may still have to drop a collective issued inside backward,
    # which takes the GIL, and doing so during shutdown aborts the process (see docs/distributed.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        failure: BaseException | None = None
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    failure = TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
                    break
        except Exception as err:  # a rank died: its own traceback is reported below
            failure = err
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                results.append(None)
                continue
            data = torch.load(path, weights_only=False)
            if not data["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{data['error']}")
            results.append(data["result"])
        if failure is not None:
            raise failure
        return results


# -- the shared toy problem ------------------------------------------------------------------

#: (key, aggregation, buffer_dtype) of the parity runs: every combination the issue names, then two of
#: Critical Momenta (aggregation "cm": CriticalMomentaAdamW, SPEC 1b), one per key and buffer dtype.
PARITY_CONFIGS = [
    (key, agg, buf) for key in ("tensor", "group") for agg in ("mean", "sum", "mid") for buf in ("fp32", "bf16")
] + [("tensor", "cm", "bf16"), ("group", "cm", "fp32")]
#: the same parity runs on the "triton" executor (under Triton's interpreter: CPU tensors), where Triton runs
TRITON_CONFIGS = [("group", "mean", "bf16", "triton"), ("tensor", "cm", "bf16", "triton")]
STEPS = 10


def triton_runs_here() -> bool:
    """Whether the "triton" rows run: the executor runs CPU tensors in this process (Triton imports,
    TRITON_INTERPRET=1), or ``$HF_MEMOPT_REQUIRE_EXECUTORS`` requires it (then a broken Triton fails them)."""
    from executors_available import wanted

    return wanted("triton")


def parity_configs() -> list[tuple[str, ...]]:
    """``PARITY_CONFIGS`` and, where Triton runs here, ``TRITON_CONFIGS``."""
    return with_triton(PARITY_CONFIGS)


def with_triton(base: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return list(base) + (TRITON_CONFIGS if triton_runs_here() else [])


def executor_kw(config: tuple[str, ...]) -> dict[str, Any]:
    """The ``executor`` keyword of a parity config (its optional fourth entry)."""
    return {"executor": config[3]} if len(config) > 3 else {}


#: few slots, so that replacement (the part that depends on priorities) happens within STEPS
OPT_KW = dict(lr=1e-2, topc=3, decay=0.7, weight_decay=0.01)


def make_model(seed: int = 0) -> torch.nn.Module:
    """A tiny MLP whose tensors shard unevenly (and, on 2+ ranks, emptily: the last layer has one row)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups like the Trainer's (decay / no decay), so ``key="group"`` sums over several tensors."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def batch(step: int, rank: int, per_rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of step ``step``'s global batch (the same for any world size's rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(per_rank, 6, generator=g), torch.randn(per_rank, 1, generator=g)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def optimizer_for(aggregation: str) -> tuple[type, dict[str, Any]]:
    """The class of a parity config and its aggregation keyword: ``"cm"`` is CriticalMomentaAdamW, which has none."""
    import hf_memopt

    if aggregation == "cm":
        return hf_memopt.CriticalMomentaAdamW, {}
    return hf_memopt.MemoryAugmentedAdamW, {"aggregation": aggregation}


def reference_run(
    key: str, aggregation: str, buffer_dtype: str, world_size: int, steps: int = STEPS, **kw: Any
) -> dict[str, torch.Tensor]:
    """The unsharded optimizer on the full batch: the gradient is the mean of the ranks' slices.

    Computed as (sum of the per-slice gradients) / world_size, the order in which DDP, FSDP and
    DeepSpeed average them on 2 ranks, so the sharded runs see bitwise the same gradients and any
    difference comes from the optimizer.
    """
    cls, agg_kw = optimizer_for(aggregation)
    model = make_model()
    opt = cls(param_groups(model), key=key, buffer_dtype=buffer_dtype, **agg_kw, **{**OPT_KW, **kw})
    for step in range(steps):
        grads = None
        for r in range(world_size):
            model.zero_grad()
            loss_fn(model, *batch(step, r)).backward()
            local = [p.grad.clone() for p in model.parameters()]
            grads = local if grads is None else [a + b for a, b in zip(grads, local)]
        for p, g in zip(model.parameters(), grads):
            p.grad = g / world_size
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class LogRecords(logging.Handler):
    """Collects the messages of the ``hf_memopt.distributed`` logger at INFO and above (in a spawned rank)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logger = logging.getLogger("hf_memopt.distributed")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc: Any) -> None:
        logger = logging.getLogger("hf_memopt.distributed")
        logger.removeHandler(self)
        logger.setLevel(self._level)


# -- DeepSpeed engines and the Trainer's view of the toy model (shared by the DeepSpeed test modules) ----


def ds_train(engine: Any, rank: int, steps: range) -> None:
    """``steps`` of the toy regression on a DeepSpeed engine, rank ``rank``'s batches."""
    for step in steps:
        loss = loss_fn(engine, *batch(step, rank))
        engine.backward(loss)
        engine.step()


def ds_full_params(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's full parameters by name (gathered under ZeRO-3)."""
    import deepspeed  # deferred: only the DeepSpeed tests need it

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


class ToyData(torch.utils.data.Dataset):
    """The toy batches for ``Trainer``: read in order (``train_sampling_strategy="sequential"``) and dealt out
    by accelerate one per-device batch of 4 per rank, step ``s`` gives rank ``r`` exactly ``batch(s, r)``."""

    def __init__(self, world: int) -> None:
        self.world = world

    def __len__(self) -> int:
        return 4 * self.world * STEPS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step, rank = divmod(i // 4, self.world)
        x, y = batch(step, rank)
        return {"x": x[i % 4], "labels": y[i % 4]}


class ToyModel(torch.nn.Module):
    """make_model() with the Trainer's calling convention (keyword inputs, a dict with ``loss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(self.net, x, labels)}
