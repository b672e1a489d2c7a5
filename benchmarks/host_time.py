"""Host time of one optimizer step: the Python work around the kernels, with the kernels stubbed out.

    python benchmarks/host_time.py                       # GPT-2-small's 148 tensors, topc 10, both executors
    python benchmarks/host_time.py --copies 2            # 296 tensors (is it flat in the number of tensors?)
    python benchmarks/host_time.py --topc 5 10 20
    python benchmarks/host_time.py --executor torch      # the reference executor: torch's ops on 8-element tensors

On a GPU the "triton" executor's step is host work (Python bookkeeping, launches) that the device
work hides only while the host stays ahead. This measures that host work on this CPU, with every
Triton launch (and, for the "cpu" executor, the C kernel call) replaced by a stub that returns at
once, on tiny tensors of GPT-2-small's count (sizes do not matter to host work). Reported per step:
the whole ``optimizer.step()``, and the revalidation's share of it: the per-step check that nothing an
executor cached changed (``hf_memopt.engine.snapshot.Snapshot.holds``: the parameters, every state
tensor's object, data pointer and size, the gradients; docs/design.md), in C++ (``--check native``, built
first if needed) or in Python (``--check python``). The rest is what does not grow with the tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run from a checkout

import hf_memopt  # noqa: E402
from hf_memopt.engine import native_guard, snapshot  # noqa: E402
from hf_memopt.engine.executors import cpu_kernel, triton_layout, triton_runtime  # noqa: E402
from hf_memopt.engine.executors import triton as triton_executor  # noqa: E402

GPT2_SMALL_TENSORS = 148


class _Launch:
    """``kernel[grid](*args, **kw)`` that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _StubKernels:
    """The kernel module with every ``@triton.jit`` function replaced by :class:`_Launch` (constants kept)."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        value = getattr(self._real, name)
        return _Launch() if hasattr(value, "warmup") else value


@contextlib.contextmanager
def stubbed(executor: str):
    """Kernels replaced by stubs; the executors' Python code runs as it does on a GPU."""
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if executor == "triton":
        stub = _StubKernels(triton_runtime.kernels())
        for module in (triton_runtime, triton_layout, triton_executor):
            patch(module, "kernels", lambda: stub)
        patch(triton_runtime, "_interpreted", True)
        patch(triton_runtime, "_TL", {})
        patch(triton_executor, "triton_unavailable", lambda: None)
    elif executor == "cpu":
        patch(cpu_kernel, "adam_fused", lambda q, ints, floats, numels, slots, n: np.zeros((len(numels), 3), np.int64))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def measure(executor: str, topc: int, n_tensors: int, steps: int) -> tuple[float, float]:
    """Median host milliseconds per step: the whole step, and the revalidation's part of it."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, generator=gen)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(8, generator=gen)
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-3, topc=topc, executor=executor)
    check_time = [0.0]
    inner = snapshot.Snapshot.holds

    def timed_holds(snap, o, group):
        t0 = time.perf_counter()
        out = inner(snap, o, group)
        check_time[0] += time.perf_counter() - t0
        return out

    whole, part = [], []
    with stubbed(executor):
        snapshot.Snapshot.holds = timed_holds
        try:
            for i in range(steps + 5):
                check_time[0] = 0.0
                t0 = time.perf_counter()
                opt.step()
                if i >= 5:  # warm: tables built, the snapshot taken
                    whole.append(time.perf_counter() - t0)
                    part.append(check_time[0])
        finally:
            snapshot.Snapshot.holds = inner
    assert opt.executor_for(0) == executor
    if executor != "torch":  # the reference executor never takes the steady path (its step runs torch's ops)
        assert opt._engine.cache.get(("snapshot", 0, executor)) is not None, "no steady step was measured"
    return statistics.median(whole) * 1e3, statistics.median(part) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topc", type=int, nargs="+", default=[10])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 2], help="multiples of GPT-2-small's 148 tensors")
    ap.add_argument("--executor", nargs="+", default=["triton", "cpu"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--check", choices=["native", "python"], default="native", help="the revalidation's implementation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check == "native":
        if native_guard.wait() is None:
            sys.exit(f"the native check is not available: {native_guard.unavailable()}")
    else:
        native_guard.load = lambda: None
    print(f"revalidation: {args.check}")
    print("| executor | topc | tensors | step host time (ms) | of it the revalidation (ms) |")
    print("|---|---:|---:|---:|---:|")
    for executor in args.executor:
        for topc in args.topc:
            for copies in args.copies:
                n = GPT2_SMALL_TENSORS * copies
                total, part = measure(executor, topc, n, args.steps)
                print(f"| {executor} | {topc} | {n} | {total:.3f} | {part:.3f} |")


if __name__ == "__main__":
    main()
