"""ZeRO-Offload on one rank: the optimizer step on DeepSpeed's CPU partitions, memopt against DeepSpeedCPUAdam.

    python benchmarks/offload_step.py                       # CUDA, NCCL: ~1.0B parameters, ZeRO-2 offload
    python benchmarks/offload_step.py --params 2e8 --steps 5
    python benchmarks/offload_step.py --threads 1 2         # the memopt step with HF_MEMOPT_CPU_THREADS=1, then 2
    python benchmarks/offload_step.py --self-check          # CPU, gloo, a toy model: proves the script runs

One process, one rank (``torch.distributed`` on 127.0.0.1: NCCL on CUDA, gloo on CPU). A stack of
``d x d`` linear layers (bf16 on CUDA, fp32 on CPU) trains under DeepSpeed ZeRO-2 with
``offload_optimizer.device="cpu"``, first with ``MemoryAugmentedAdamW`` as the client (bound to the
partitions, ``"zero_force_ds_cpu_optimizer": false``), then with ``DeepSpeedCPUAdam``. Timed: the
client optimizer's ``step()`` on the fp32 CPU partition (median over ``--steps`` after one warm-up
step), and the whole ``engine.step()``. Checked, and the script fails otherwise: the memopt client
ran on the "cpu" executor, and its norm reducer all-reduced a CPU-resident norm vector (on NCCL by
moving it to the GPU: the path ZeRO-Offload takes on CUDA). Prints one JSON line per run.

DeepSpeed not installed: says so and exits 0. DeepSpeedCPUAdam cannot be built here (its op is
compiled on first use): says so, times memopt alone. ``--self-check`` also compares the offloaded
run bit for bit with the same run without offload.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_process_group(cuda: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))


def _model(params: float, dim: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    layers = max(1, round(params / (dim * dim)))
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(dim, dim, bias=False), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks).to(device=device, dtype=dtype)


def _config(offload: bool, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 2}
    if offload:
        # pin_memory=True needs an accelerator: a CPU-only torch cannot pin
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }


class _Timed:
    """Wraps ``optimizer.step`` and records the wall time of each call."""

    def __init__(self, optimizer: Any, cuda: bool) -> None:
        self.times: list[float] = []
        self._step = optimizer.step
        self._cuda = cuda
        optimizer.step = self  # the instance attribute shadows the method: DeepSpeed calls this

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self._step(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out


class _ReductionLog:
    """Records what the norm reducer all-reduces: the tensor's device and whether the backend takes CPU tensors."""

    def __init__(self) -> None:
        from hf_memopt.distributed import reducer

        self.calls: list[dict[str, Any]] = []
        self._module = reducer
        self._original = reducer.all_reduce

        def logged(t: torch.Tensor, group: Any, op: Any = None) -> None:
            self.calls.append(
                {"device": t.device.type, "backend_takes_cpu": reducer._backend_has_cpu(group), "numel": t.numel()}
            )
            self._original(t, group, op)

        reducer.all_reduce = logged

    def close(self) -> None:
        self._module.all_reduce = self._original


def _train(engine: Any, model_dim: int, steps: int, cuda: bool, dtype: torch.dtype) -> list[float]:
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(1)
    totals = []
    for _ in range(steps):
        x = torch.randn(4, model_dim, generator=g, device=device, dtype=dtype)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - start)
    return totals


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def run_memopt(args: argparse.Namespace, cuda: bool, offload: bool = True) -> dict[str, Any]:
    import deepspeed

    import hf_memopt
    from hf_memopt.distributed import deepspeed as ds_adapter

    dtype = torch.bfloat16 if cuda else torch.float32
    model = _model(args.params, args.dim, dtype, "cuda" if cuda else "cpu")
    opt = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-4, topc=args.topc, buffer_dtype=args.buffer_dtype)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(offload, cuda))
    client = ds_adapter.bind(engine)
    timed = _Timed(client, cuda)
    log = _ReductionLog()
    rows = []
    try:
        for threads in args.threads or [None]:
            if threads is not None:
                os.environ["HF_MEMOPT_CPU_THREADS"] = str(threads)
            timed.times.clear()
            totals = _train(engine, args.dim, args.steps, cuda, dtype)
            rows.append(
                {
                    "optimizer": "memopt_adamw",
                    "offload": offload,
                    "threads": threads if threads is not None else "default",
                    "client_step_s": _median_after_warmup(timed.times),
                    "engine_step_s": _median_after_warmup(totals),
                    "executor": client.executor_for(0),
                }
            )
    finally:
        log.close()
    partition = engine.optimizer.single_partition_of_fp32_groups[0]
    params = (
        {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()} if args.self_check else None
    )
    return {
        "rows": rows,
        "numel": sum(p.numel() for p in model.parameters()),
        "partition_device": partition.device.type,
        "reductions": log.calls,
        "params": params,
    }


def run_ds_adam(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    dtype = torch.bfloat16 if cuda else torch.float32
    model = _model(args.params, args.dim, dtype, "cuda" if cuda else "cpu")
    opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, adamw_mode=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(True, cuda))
    timed = _Timed(engine.optimizer.optimizer, cuda)
    totals = _train(engine, args.dim, args.steps, cuda, dtype)
    return {
        "optimizer": "DeepSpeedCPUAdam",
        "offload": True,
        "threads": torch.get_num_threads(),
        "client_step_s": _median_after_warmup(timed.times),
        "engine_step_s": _median_after_warmup(totals),
    }


def ds_adam_ready() -> str | None:
    """Why DeepSpeedCPUAdam would need a JIT build of its op first (minutes), or None when it is built."""
    import glob

    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam"):
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    if glob.glob(os.path.join(root, "**", "cpu_adam*.so"), recursive=True):
        return None
    return "its op is neither pre-built (DS_BUILD_CPU_ADAM=1) nor JIT-built yet; --build-ds-adam builds it (minutes)"


def _check(result: dict[str, Any], cuda: bool) -> list[str]:
    """What must hold of the memopt offload run; the failures, as sentences."""
    problems = []
    if result["partition_device"] != "cpu":
        problems.append(f"the client's partition is on {result['partition_device']}, not in host RAM")
    if any(row["executor"] != "cpu" for row in result["rows"]):
        problems.append(f"executors {[row['executor'] for row in result['rows']]}: the 'cpu' executor did not run")
    cpu_calls = [c for c in result["reductions"] if c["device"] == "cpu"]
    if not cpu_calls:
        problems.append("the norm reducer never all-reduced a CPU norm vector")
    if cuda and not any(not c["backend_takes_cpu"] for c in cpu_calls):
        problems.append("the NCCL path (CPU norms moved to the GPU for the all-reduce) did not run")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.0e9, help="parameter count of the model (default 1e9)")
    ap.add_argument("--dim", type=int, default=8192, help="width of the square linear layers (default 8192)")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up (default 4)")
    ap.add_argument("--topc", type=int, default=5)
    ap.add_argument("--buffer-dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, nargs="*", help="HF_MEMOPT_CPU_THREADS values to time in turn")
    ap.add_argument("--no-ds-adam", action="store_true", help="skip the DeepSpeedCPUAdam run")
    ap.add_argument("--build-ds-adam", action="store_true", help="JIT-build DeepSpeedCPUAdam's op if needed")
    ap.add_argument("--self-check", action="store_true", help="CPU, gloo, a toy model, checks only")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.self_check
    if args.self_check:
        os.environ["DS_ACCELERATOR"] = "cpu"
        args.params, args.dim, args.steps, args.no_ds_adam = 2 * 64 * 64, 64, 3, True
    elif not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # not installed, or installed without a usable accelerator
        print(f"offload_step: DeepSpeed is not available here ({type(err).__name__}: {err}); nothing to measure")
        return 0
    _init_process_group(cuda)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    print(f"offload_step: {device}, torch {torch.__version__}, deepspeed {sys.modules['deepspeed'].__version__}")
    result = run_memopt(args, cuda)
    print(f"offload_step: {result['numel']:,} parameters, ZeRO-2, optimizer offload to CPU, topc={args.topc}")
    for row in result["rows"]:
        print(json.dumps(row))
    print(json.dumps({"reductions": result["reductions"][:3], "count": len(result["reductions"])}))
    problems = _check(result, cuda)
    if args.self_check:
        plain = run_memopt(args, cuda, offload=False)
        same = all(torch.equal(result["params"][k], plain["params"][k]) for k in plain["params"])
        if not same:
            problems.append("the offloaded run differs from the run without offload")
    gc.collect()  # the memopt engine's host state goes before DeepSpeedCPUAdam's is allocated
    if cuda:
        torch.cuda.empty_cache()
    why_not = None if args.no_ds_adam or args.build_ds_adam else ds_adam_ready()
    if why_not is not None:
        print(f"offload_step: DeepSpeedCPUAdam skipped: {why_not}")
    elif not args.no_ds_adam:
        try:
            ds_row = run_ds_adam(args, cuda)
        except Exception as err:  # the op is JIT-built: no compiler, no CUDA headers, ...
            print(f"offload_step: DeepSpeedCPUAdam unavailable here ({type(err).__name__}: {str(err)[:300]})")
        else:
            print(json.dumps(ds_row))
            memopt = result["rows"][0]["client_step_s"]
            print(f"offload_step: memopt client step / DeepSpeedCPUAdam step = {memopt / ds_row['client_step_s']:.2f}")
    import torch.distributed as dist

    dist.destroy_process_group()
    if problems:
        for problem in problems:
            print(f"offload_step: FAILED: {problem}")
        return 1
    print("offload_step: OK (the 'cpu' executor stepped the offloaded partition; the norm path ran)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
