"""Optimizer state in host RAM on one rank: the offloaded step, memopt against the engine's own CPU Adam.

    python benchmarks/offload_step.py                       # CUDA: ~1.0B parameters; DeepSpeed if installed, else FSDP2
    python benchmarks/offload_step.py --engine fsdp2        # FSDP2 CPUOffloadPolicy (needs only torch)
    python benchmarks/offload_step.py --params 2e8 --steps 5
    python benchmarks/offload_step.py --threads 1 2         # the memopt step with HF_MEMOPT_CPU_THREADS=1, then 2
    python benchmarks/offload_step.py --self-check          # CPU, gloo, a toy model: proves the script runs

One process, one rank (``torch.distributed`` on 127.0.0.1: NCCL on CUDA, gloo on CPU), a stack of
``d x d`` linear layers. Two engines (``--engine``; ``auto``, the default, takes DeepSpeed when it
imports and says why not otherwise):

* ``deepspeed``: ZeRO-2 with ``offload_optimizer.device="cpu"`` (bf16 model on CUDA, fp32 on CPU),
  first with ``MemoryAugmentedAdamW`` as the client (bound to the partitions,
  ``"zero_force_ds_cpu_optimizer": false``), then with ``DeepSpeedCPUAdam``. Timed: the client
  optimizer's ``step()`` on the fp32 CPU partition, and the whole ``engine.step()``.
* ``fsdp2``: ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` on every layer (fp32 sharded
  parameters in host RAM, bf16 compute on CUDA), ``MemoryAugmentedAdamW`` against
  ``torch.optim.AdamW`` (its default for CPU tensors, a for-loop) and ``torch.optim.AdamW(fused=True)``.
  Timed: ``optimizer.step()`` on the CPU DTensors, and the whole iteration (forward, backward, step).

Medians over ``--steps`` after one warm-up step (the first step allocates the state). Checked, and
the script fails otherwise: the memopt optimizer stepped host-RAM state on the "cpu" executor, and its
norm reducer all-reduced a CPU-resident norm vector (on NCCL by moving it to the GPU: the path
optimizer offload takes on CUDA). Prints one JSON line per run.

DeepSpeedCPUAdam cannot be built here (its op is compiled on first use): says so, times memopt alone.
``--self-check`` (CPU, tiny) also compares the offloaded memopt run bit for bit with the same run
without offload.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run from a checkout

ENGINES = ("auto", "deepspeed", "fsdp2")
#: the second time of each JSON row, besides ``step_s`` (the optimizer's ``step()`` on the host state):
#: under DeepSpeed ``engine.step()`` (the client's step and DeepSpeed's copies around it), under FSDP2
#: the whole iteration (forward, backward with the gradients' copy to the host, step)
TOTAL_KEY = {"deepspeed-zero2": "engine_step_s", "fsdp2": "iteration_s"}


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
    # "nccl" alone, not torch's default "cpu:gloo,cuda:nccl": with a CPU backend in the group the norm
    # reducer would all-reduce the CPU norms where they are, and the NCCL path would not run
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))


def _model(params: float, dim: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """About ``params`` parameters in ``d x d`` linear layers, drawn on ``device`` (a CPU draw of 1e9 takes seconds)."""
    layers = max(1, round(params / (dim * dim)))
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(dim, dim, bias=False, device=device), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks).to(dtype=dtype)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class _Timed:
    """Wraps ``optimizer.step`` and records the wall time of each call."""

    def __init__(self, optimizer: Any) -> None:
        self.times: list[float] = []
        self._step = optimizer.step
        optimizer.step = self  # the instance attribute shadows the method: the engines call this

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


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def _kernel_threads() -> int:
    from hf_memopt.engine.executors.cpu_kernel import kernel_threads

    return kernel_threads()


def _memopt_rows(
    args: argparse.Namespace, optimizer: Any, timed: _Timed, run: Callable[[], list[float]], row: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``run`` (one training run of ``args.steps``) once per ``--threads`` value; the JSON rows and the reductions."""
    log = _ReductionLog()
    rows = []
    try:
        for threads in args.threads or [None]:
            if threads is not None:
                os.environ["HF_MEMOPT_CPU_THREADS"] = str(threads)
            timed.times.clear()
            totals = run()
            rows.append(
                {
                    **row,
                    "threads": _kernel_threads(),
                    "step_s": _median_after_warmup(timed.times),
                    TOTAL_KEY[row["engine"]]: _median_after_warmup(totals),
                    "executor": optimizer.executor_for(0),
                }
            )
    finally:
        log.close()
    return rows, log.calls


# -- DeepSpeed ZeRO-2 ------------------------------------------------------------------------------


def _ds_config(offload: bool, bf16: bool) -> dict[str, Any]:
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


def _ds_train(engine: Any, model_dim: int, steps: int, cuda: bool, dtype: torch.dtype) -> list[float]:
    """Times of ``engine.step()`` (the client's step plus DeepSpeed's copies around it)."""
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(1)
    totals = []
    for _ in range(steps):
        x = torch.randn(4, model_dim, generator=g, device=device, dtype=dtype)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        _sync(cuda)
        start = time.perf_counter()
        engine.step()
        _sync(cuda)
        totals.append(time.perf_counter() - start)
    return totals


def run_ds_memopt(args: argparse.Namespace, cuda: bool, offload: bool = True) -> dict[str, Any]:
    import deepspeed

    import hf_memopt
    from hf_memopt.distributed import deepspeed as ds_adapter

    dtype = torch.bfloat16 if cuda else torch.float32
    model = _model(args.params, args.dim, dtype, "cuda" if cuda else "cpu")
    opt = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-4, topc=args.topc, buffer_dtype=args.buffer_dtype)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(offload, cuda))
    client = ds_adapter.bind(engine)
    timed = _Timed(client)
    rows, reductions = _memopt_rows(
        args,
        client,
        timed,
        lambda: _ds_train(engine, args.dim, args.steps, cuda, dtype),
        {"engine": "deepspeed-zero2", "optimizer": "memopt_adamw", "offload": offload},
    )
    partition = engine.optimizer.single_partition_of_fp32_groups[0]
    params = (
        {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()} if args.self_check else None
    )
    return {
        "rows": rows,
        "numel": sum(p.numel() for p in model.parameters()),
        "state_device": partition.device.type,
        "reductions": reductions,
        "params": params,
    }


def run_ds_adam(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    dtype = torch.bfloat16 if cuda else torch.float32
    model = _model(args.params, args.dim, dtype, "cuda" if cuda else "cpu")
    opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, adamw_mode=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(True, cuda))
    timed = _Timed(engine.optimizer.optimizer)
    totals = _ds_train(engine, args.dim, args.steps, cuda, dtype)
    return {
        "engine": "deepspeed-zero2",
        "optimizer": "DeepSpeedCPUAdam",
        "offload": True,
        "threads": torch.get_num_threads(),
        "step_s": _median_after_warmup(timed.times),
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


def _bench_memopt(args: argparse.Namespace, cuda: bool, run: Any, label: str) -> tuple[dict[str, Any], list[str]]:
    """One engine's memopt run (``run(args, cuda, offload=True)``): printed, checked, compared with the same
    run without offload under ``--self-check``; its host memory released before a baseline runs."""
    result = run(args, cuda)
    print(f"offload_step: {result['numel']:,} parameters, {label}, topc={args.topc}")
    _print_result(result)
    problems = _check(result, cuda)
    if args.self_check:
        problems += _compare(result, run(args, cuda, offload=False))
    _release(cuda)
    return result, problems


def bench_deepspeed(args: argparse.Namespace, cuda: bool) -> list[str]:
    """The ZeRO-2 offload runs; the problems found, as sentences."""
    # the memopt engine's host state goes before DeepSpeedCPUAdam's is allocated (_bench_memopt releases it)
    result, problems = _bench_memopt(args, cuda, run_ds_memopt, "DeepSpeed ZeRO-2, optimizer offload to CPU")
    why_not = None if args.no_baseline or args.build_ds_adam else ds_adam_ready()
    if why_not is not None:
        print(f"offload_step: DeepSpeedCPUAdam skipped: {why_not}")
    elif not args.no_baseline:
        try:
            ds_row = run_ds_adam(args, cuda)
        except Exception as err:  # the op is JIT-built: no compiler, no CUDA headers, ...
            print(f"offload_step: DeepSpeedCPUAdam unavailable here ({type(err).__name__}: {str(err)[:300]})")
        else:
            print(json.dumps(ds_row))
            _print_ratio(result["rows"][0], ds_row)
    return problems


# -- FSDP2 CPUOffloadPolicy ------------------------------------------------------------------------


def _fsdp2_model(args: argparse.Namespace, cuda: bool, offload: bool) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = "cuda" if cuda else "cpu"
    # fp32 sharded parameters (what the optimizer steps, in host RAM under the policy); bf16 compute on
    # CUDA as a user would run it; fp32 throughout on CPU, so that the self-check can compare bits
    model = _model(args.params, args.dim, torch.float32, device)
    mesh = init_device_mesh(device, (1,))
    # pin_memory needs an accelerator: a CPU-only torch fails with "Cannot access accelerator device"
    policy = CPUOffloadPolicy(pin_memory=cuda) if offload else OffloadPolicy()
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, offload_policy=policy, mp_policy=mp)
    fully_shard(model, mesh=mesh, offload_policy=policy, mp_policy=mp)
    return model


def _fsdp2_train(model: torch.nn.Module, optimizer: Any, model_dim: int, steps: int, cuda: bool) -> list[float]:
    """Times of whole iterations (forward, backward with FSDP2's gradient copy to the host, step)."""
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device=device).manual_seed(1)
    totals = []
    for _ in range(steps):
        x = torch.randn(4, model_dim, generator=g, device=device)
        _sync(cuda)
        start = time.perf_counter()
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(cuda)
        totals.append(time.perf_counter() - start)
    return totals


def _local_devices(model: torch.nn.Module) -> str:
    return ",".join(sorted({p.to_local().device.type for p in model.parameters()}))


def run_fsdp2_memopt(args: argparse.Namespace, cuda: bool, offload: bool = True) -> dict[str, Any]:
    import hf_memopt
    from hf_memopt.distributed import dtensor

    model = _fsdp2_model(args, cuda, offload)
    opt = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-4, topc=args.topc, buffer_dtype=args.buffer_dtype)
    # explicitly: on one process the auto-detection installs no reducer (nothing to reduce), and the
    # reducer's path is what this run is to exercise, as on N ranks
    dtensor.attach(opt)
    timed = _Timed(opt)
    rows, reductions = _memopt_rows(
        args,
        opt,
        timed,
        lambda: _fsdp2_train(model, opt, args.dim, args.steps, cuda),
        {"engine": "fsdp2", "optimizer": "memopt_adamw", "offload": offload},
    )
    params = (
        {n: p.full_tensor().detach().float().cpu().clone() for n, p in model.named_parameters()}
        if args.self_check
        else None
    )
    return {
        "rows": rows,
        "numel": sum(p.numel() for p in model.parameters()),
        "state_device": _local_devices(model),
        "reductions": reductions,
        "params": params,
    }


def run_fsdp2_adamw(args: argparse.Namespace, cuda: bool, fused: bool) -> dict[str, Any]:
    model = _fsdp2_model(args, cuda, offload=True)
    # fused=False is not torch's default on CUDA, but it is on these CPU tensors (no foreach kernels on CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    timed = _Timed(opt)
    totals = _fsdp2_train(model, opt, args.dim, args.steps, cuda)
    return {
        "engine": "fsdp2",
        "optimizer": "adamw_torch_fused" if fused else "adamw_torch",
        "offload": True,
        "threads": torch.get_num_threads(),
        "step_s": _median_after_warmup(timed.times),
        "iteration_s": _median_after_warmup(totals),
    }


def bench_fsdp2(args: argparse.Namespace, cuda: bool) -> list[str]:
    """The CPUOffloadPolicy runs; the problems found, as sentences."""
    result, problems = _bench_memopt(args, cuda, run_fsdp2_memopt, "FSDP2 CPUOffloadPolicy")
    if args.no_baseline:
        return problems
    for fused in (False, True):
        try:
            row = run_fsdp2_adamw(args, cuda, fused)
        except Exception as err:  # a baseline that does not run here is reported, the memopt numbers still stand
            name = "fused " if fused else ""
            print(f"offload_step: torch {name}AdamW under CPUOffloadPolicy failed ({type(err).__name__}: {err})")
            continue
        finally:
            _release(cuda)
        print(json.dumps(row))
        _print_ratio(result["rows"][0], row)
    return problems


# -- common ------------------------------------------------------------------------------------------


def _release(cuda: bool) -> None:
    """Free the last run's host and device memory before the next run allocates its own."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _print_result(result: dict[str, Any]) -> None:
    for row in result["rows"]:
        print(json.dumps(row))
    print(json.dumps({"reductions": result["reductions"][:3], "count": len(result["reductions"])}))


def _print_ratio(memopt: dict[str, Any], baseline: dict[str, Any]) -> None:
    ratio = memopt["step_s"] / baseline["step_s"]
    print(
        f"offload_step: memopt_adamw step ({memopt['threads']} threads) / {baseline['optimizer']} step "
        f"({baseline['threads']} threads) = {ratio:.2f}"
    )


def _check(result: dict[str, Any], cuda: bool) -> list[str]:
    """What must hold of the memopt offload run; the failures, as sentences."""
    problems = []
    if result["state_device"] != "cpu":
        problems.append(f"the optimizer's state is on {result['state_device']}, not in host RAM")
    if any(row["executor"] != "cpu" for row in result["rows"]):
        problems.append(f"executors {[row['executor'] for row in result['rows']]}: the 'cpu' executor did not run")
    cpu_calls = [c for c in result["reductions"] if c["device"] == "cpu"]
    if not cpu_calls:
        problems.append("the norm reducer never all-reduced a CPU norm vector")
    if cuda and not any(not c["backend_takes_cpu"] for c in cpu_calls):
        problems.append("the NCCL path (CPU norms moved to the GPU for the all-reduce) did not run")
    return problems


def _compare(offloaded: dict[str, Any], plain: dict[str, Any]) -> list[str]:
    same = offloaded["params"].keys() == plain["params"].keys() and all(
        torch.equal(offloaded["params"][k], plain["params"][k]) for k in plain["params"]
    )
    return [] if same else ["the offloaded run differs from the run without offload"]


def deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here (``None``: it imports). Set ``DS_ACCELERATOR`` before calling on CPU."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed on this machine"
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # installed, but without a usable accelerator or a dependency
        return f"deepspeed does not import here ({type(err).__name__}: {err})"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="deepspeed (ZeRO-2 offload), fsdp2 (CPUOffloadPolicy), auto: deepspeed if it imports (default)",
    )
    ap.add_argument("--params", type=float, default=1.0e9, help="parameter count of the model (default 1e9)")
    ap.add_argument("--dim", type=int, default=8192, help="width of the square linear layers (default 8192)")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up (default 4)")
    ap.add_argument("--topc", type=int, default=5)
    ap.add_argument("--buffer-dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, nargs="*", help="HF_MEMOPT_CPU_THREADS values to time in turn")
    ap.add_argument(
        "--no-baseline",
        "--no-ds-adam",
        dest="no_baseline",
        action="store_true",
        help="time memopt alone (no DeepSpeedCPUAdam / torch AdamW run)",
    )
    ap.add_argument("--build-ds-adam", action="store_true", help="JIT-build DeepSpeedCPUAdam's op if needed")
    ap.add_argument("--self-check", action="store_true", help="CPU, gloo, a toy model, checks only")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be at least 1; got {args.steps}")
    if any(t < 1 for t in args.threads or []):
        ap.error(f"--threads takes positive integers; got {args.threads}")
    cuda = torch.cuda.is_available() and not args.self_check
    if args.self_check:
        args.params, args.dim, args.steps = 2 * 64 * 64, 64, 3
    # DeepSpeed picks its accelerator when imported: a CUDA machine's would be CUDA, even for the CPU self-check
    if args.self_check:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine = args.engine
    if engine in ("auto", "deepspeed"):
        why_not = deepspeed_unavailable()
        if why_not is not None and engine == "deepspeed":
            print(f"offload_step: DeepSpeed ZeRO-2 offload: skipped: {why_not}; nothing measured")
            return 0
        if why_not is not None:
            print(f"offload_step: DeepSpeed ZeRO-2 offload: skipped: {why_not}; the FSDP2 CPUOffloadPolicy run instead")
            engine = "fsdp2"
        else:
            engine = "deepspeed"
    if engine == "deepspeed" and args.self_check:
        args.no_baseline = True  # DeepSpeedCPUAdam's op takes minutes to build
    _init_process_group(cuda)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({len(os.sched_getaffinity(0))} cores)"
    ds = sys.modules.get("deepspeed")
    print(
        f"offload_step: {device}, torch {torch.__version__}"
        + (f", deepspeed {ds.__version__}" if engine == "deepspeed" and ds else "")
        + f", {torch.get_num_threads()} torch threads"
    )
    import torch.distributed as dist

    try:
        problems = bench_deepspeed(args, cuda) if engine == "deepspeed" else bench_fsdp2(args, cuda)
    finally:
        dist.destroy_process_group()
    if problems:
        for problem in problems:
            print(f"offload_step: FAILED: {problem}")
        return 1
    print("offload_step: OK (the 'cpu' executor stepped the offloaded state; the norm path ran)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
