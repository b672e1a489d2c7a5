"""Optimizer step time and state bytes: hf_memopt against torch's AdamW.

    python benchmarks/step_time.py                          # 23.4M params in 76 GPT-like tensors
    python benchmarks/step_time.py --model gpt2-124m        # GPT-2 small shapes
    python benchmarks/step_time.py --admit rarely           # gradients that the memory rejects
    python benchmarks/step_time.py --norms --topc 10        # + the norm pass timed alone
    python benchmarks/step_time.py --key tensor             # one priority per tensor (default: per group)
    python benchmarks/step_time.py --executor torch         # force an executor (default: auto)
    python benchmarks/step_time.py --model gpt2-124m --profile-ops   # ops launched per step, per executor
    python benchmarks/step_time.py --optimizer cm --topc 10 # Critical Momenta (memopt_adamw_cm)
    python benchmarks/step_time.py --device cuda --model gpt-1b --topc 5 10   # on a GPU ("auto": triton)

Times ``optimizer.step()`` alone (gradients are fixed tensors), median over ``--steps`` steps
after warm-up, with torch's intra-op threads at ``--threads``. Each row is timed in alternating
rounds against torch's fused AdamW in the same process, and the ratio is taken from those
paired medians: on a machine shared with other work the absolute times drift, the ratio less.
The traffic bound is the ratio of words moved per element to fused AdamW's 7 (read p g m v,
write p m v): an admitting step adds the norm pass over g, S, and the evicted/written slot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_memopt
from hf_memopt.engine import norms
from hf_memopt.engine.executors.cpu_kernel import load as load_kernel
from hf_memopt.engine.state import tensor_bytes

MODELS = {
    # name: (vocab, positions, n_embd, n_layer)
    "gpt23m": (32768, 512, 384, 6),
    "gpt2-124m": (50257, 1024, 768, 12),
    "gpt-1b": (50257, 2048, 2048, 18),  # 1.01B params in 220 tensors (a GPU's size; ~16 GB per optimizer)
    "tiny": (256, 32, 32, 2),  # for self-checks (benchmarks/gpu_check.sh --self-check)
}


def gpt_shapes(vocab: int, positions: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """The tensors of a GPT-2 style model (weights tied), in module order."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def make(shapes: list[tuple[int, ...]], device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and gradients drawn where they live: on a GPU, the 1B set's two billion normals take
    milliseconds there against minutes for the CPU's generator."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.02) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device) * 1e-3 for s in shapes]
    return params, grads


def set_grads(params, grads, t: int, admit: str) -> None:
    scale = 1.0 if admit == "always" else 0.5**t  # "rarely": each newcomer is smaller than all it meets
    for p, g in zip(params, grads):
        p.grad = g if scale == 1.0 else g * scale


def timed_steps(opt, params, grads, first: int, count: int, admit: str, device) -> list[float]:
    times = []
    for t in range(first, first + count):
        set_grads(params, grads, t, admit)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def paired(factory, ref_factory, shapes, device, args) -> tuple[float, float, int, str | None]:
    """Median step time of ``factory``'s optimizer and of the reference, timed in alternating rounds
    in one process, so that a machine whose speed drifts (shared cores) skews both alike."""
    params, grads = make(shapes, device)
    opt = factory(params)
    ref_params, ref_grads = make(shapes, device)
    ref = ref_factory(ref_params)
    timed_steps(opt, params, grads, 0, args.warmup, args.admit, device)
    timed_steps(ref, ref_params, ref_grads, 0, args.warmup, args.admit, device)
    mine, theirs = [], []
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        first = args.warmup + r * per_round
        mine += timed_steps(opt, params, grads, first, per_round, args.admit, device)
        theirs += timed_steps(ref, ref_params, ref_grads, first, per_round, args.admit, device)
    ran = opt.executor_for(0) if hasattr(opt, "executor_for") else None
    return statistics.median(mine), statistics.median(theirs), state_bytes(opt), ran


def state_bytes(opt) -> int:
    return sum(tensor_bytes(st.values()) for st in opt.state.values())


class CountOps(TorchDispatchMode):
    """Counts the aten ops that launch work (views and metadata ops launch nothing on a device), and the
    device-to-host copies among them."""

    FREE = ("view", "alias", "detach", "_unsafe_view", "as_strided", "narrow", "slice", "select", "lift_fresh")
    FREE += ("_record_function_enter_new", "_record_function_exit")  # profiler markers

    #: > 0 while a Triton kernel launches: under the interpreter its own tensor ops are not the step's
    paused = 0

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.FREE and not CountOps.paused:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class CountLaunches:
    """Counts the launches of the "triton" executor's kernels (as "triton:<kernel>")."""

    NAMES = ("norm_partials", "unit_sums", "decide", "apply")

    def __enter__(self) -> CountLaunches:
        self.ops: dict[str, int] = {}
        self._saved = {}
        from hf_memopt.engine.executors import triton as triton_executor

        self._module = triton_executor.kernels()
        if self._module is None:
            return self
        for name in self.NAMES:
            kernel = getattr(self._module, name)
            self._saved[name] = kernel
            setattr(self._module, name, _Counted(kernel, f"triton:{name}", self.ops))
        return self

    def __exit__(self, *exc) -> None:
        for name, kernel in self._saved.items():
            setattr(self._module, name, kernel)


class _Counted:
    def __init__(self, kernel, label: str, ops: dict[str, int]) -> None:
        self.kernel, self.label, self.ops = kernel, label, ops

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.ops[self.label] = self.ops.get(self.label, 0) + 1
            CountOps.paused += 1
            try:
                return launch(*args, **kwargs)
            finally:
                CountOps.paused -= 1

        return counted


def profile_ops(shapes: list[tuple[int, ...]], args) -> None:
    """Ops launched by one admitting step, per executor, for the model's tensors and for twice as many.

    The count depends on the number of tensors, not on their sizes: each dimension is capped at 64 so
    that this runs in seconds on any machine.
    """
    small = [tuple(min(d, 64) for d in s) for s in shapes]
    configs = [
        ("torch AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        ("torch AdamW foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
        (
            "memopt_adamw torch, fused",
            lambda p: hf_memopt.MemoryAugmentedAdamW(p, topc=3, executor="torch", fused=True),
        ),
        (
            "memopt_adamw torch, foreach",
            lambda p: hf_memopt.MemoryAugmentedAdamW(p, topc=3, executor="torch", foreach=True),
        ),
    ]
    if load_kernel() is not None:
        configs.append(("memopt_adamw cpu", lambda p: hf_memopt.MemoryAugmentedAdamW(p, topc=3, executor="cpu")))
    # On CPU the "torch" executor shares the kernel's norm pass; every other device takes foreach norms.
    gpu_like = ("memopt_adamw torch, fused, foreach norms (the path of non-CPU devices)", configs[2][1])
    configs.append(gpu_like)
    from hf_memopt.engine.executors import triton as triton_executor

    if triton_executor.runs_on(torch.device(args.device)):  # on CPU: TRITON_INTERPRET=1
        for name, cls in (
            ("memopt_adamw", hf_memopt.MemoryAugmentedAdamW),
            ("memopt_sgd", hf_memopt.MemoryAugmentedSGD),
        ):
            configs.append(
                (f"{name} triton (Triton launches + aten ops)", lambda p, cls=cls: cls(p, topc=3, executor="triton"))
            )
    print(f"| optimizer | ops/step, {len(small)} tensors | ops/step, {2 * len(small)} tensors | most frequent ops |")
    print("|---|---:|---:|---|")
    for label, factory in configs:
        counts = []
        if label == gpu_like[0]:
            norms._kernel_takes = lambda views: False  # what local_sq_norms does off the CPU
        for layout in (small, small + small):
            params, grads = make(layout, torch.device(args.device))
            opt = factory(params)
            for t in range(4):  # past the fill: every later step admits by eviction (growing norms)
                for p, g in zip(params, grads):
                    p.grad = g * (t + 1)
                opt.step()
            with CountOps() as mode, CountLaunches() as launches:
                opt.step()
            counts.append({**mode.ops, **launches.ops})
        top = ", ".join(f"{n} {k}" for k, n in sorted(counts[0].items(), key=lambda kv: -kv[1])[:4])
        print(f"| {label} | {sum(counts[0].values())} | {sum(counts[1].values())} | {top} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt23m")
    ap.add_argument("--topc", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--buffer-dtype", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6, help="alternations with the reference")
    ap.add_argument("--warmup", type=int, default=25, help="> topc, so every slot is written before timing")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--admit", choices=["always", "rarely"], default="always")
    ap.add_argument("--key", choices=["group", "tensor"], default="group", help="hf_memopt's priority key")
    ap.add_argument(
        "--executor", choices=["auto", "torch", "cpu", "triton"], default="auto", help="hf_memopt's executor"
    )
    ap.add_argument(
        "--optimizer",
        choices=["adamw", "cm"],
        default="adamw",
        help="hf_memopt's optimizer: MemoryAugmentedAdamW or CriticalMomentaAdamW (memopt_adamw_cm)",
    )
    ap.add_argument("--profile-ops", action="store_true", help="count the ops one step launches, per executor")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument(
        "--norms",
        action="store_true",
        help="also time the norm pass alone (hf_memopt's fp64 sum of squares of every gradient, CPU kernel)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = gpt_shapes(*MODELS[args.model])
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"# {args.model}: {numel / 1e6:.2f}M params in {len(shapes)} tensors; device {device}; "
        f"{args.threads} threads; torch {torch.__version__}; admit={args.admit}; key={args.key}; "
        f"CPU kernel {'on' if load_kernel() is not None else 'off'}",
        flush=True,
    )
    if args.profile_ops:
        profile_ops(shapes, args)
        return
    rows = []
    fused = device.type in ("cpu", "cuda")

    def reference(p):
        return torch.optim.AdamW(p, lr=1e-3, fused=True) if fused else torch.optim.AdamW(p, lr=1e-3)

    def run(label, factory, words):
        ms, ref_ms, nbytes, ran = paired(factory, reference, shapes, device, args)
        if ran is not None:
            label = f"{label} [{ran}]"  # the executor that ran it
        rows.append(dict(optimizer=label, ms=1e3 * ms, ref_ms=1e3 * ref_ms, state_bytes=nbytes, words=words))
        print(f"  {label:<30} {1e3 * ms:8.2f} ms  (reference {1e3 * ref_ms:.2f} ms)", file=sys.stderr, flush=True)

    run("torch AdamW for-loop", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False), 7)
    run("torch AdamW foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), 7)
    if fused:
        run("torch AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 7)
    for bd in args.buffer_dtype:
        slot = 0.5 if bd == "bf16" else 1.0
        # + 1: the norm pass reads g before the decisions; an admitting step then reads p g m v S and
        # the evicted slot and writes p m v S and the slot; a rejecting one reads p g m v S, writes p m v
        words = 1 + (9 + 2 * slot if args.admit == "always" else 8)
        # Critical Momenta moves the same words: it reads m where Adam reads it anyway and stores m, not g
        cls, name = (
            (hf_memopt.CriticalMomentaAdamW, "memopt_adamw_cm")
            if args.optimizer == "cm"
            else (hf_memopt.MemoryAugmentedAdamW, "memopt_adamw")
        )
        for c in args.topc:
            run(
                f"{name} topc={c} {bd}",
                lambda p, c=c, bd=bd, cls=cls: cls(
                    p, lr=1e-3, topc=c, decay=0.7, buffer_dtype=bd, key=args.key, executor=args.executor
                ),
                words,
            )
    if args.norms and load_kernel() is None:
        print(
            "# --norms: the CPU kernel is off (HF_MEMOPT_KERNELS=0 or no C compiler), so there is no norm pass to time"
        )
    elif args.norms:
        import numpy as np

        from hf_memopt.engine.executors.cpu_kernel import sq_norms

        _, grads = make(shapes, device)
        ptrs, numels = np.array([g.data_ptr() for g in grads]), np.array([g.numel() for g in grads])
        times = []
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            sq_norms(ptrs, numels, args.threads)
            times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times[args.warmup :])
        print(f"# norm pass alone: {ms:.2f} ms, {4 * numel / (ms * 1e6):.0f} GB/s read (median of {args.steps})")
    ref_label = "fused AdamW" if fused else "AdamW"
    print(
        f"| optimizer | ms/step | x {ref_label} (paired) | traffic bound, x | bytes moved/step | GB/s | "
        "state bytes/param |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        moved = 4 * r["words"] * numel  # what a single pass must read and write, in fp32 words per element
        print(
            f"| {r['optimizer']} | {r['ms']:.2f} | {r['ms'] / r['ref_ms']:.2f} | {r['words'] / 7:.2f} | "
            f"{moved / 1e6:.0f} MB | {moved / (r['ms'] * 1e6):.0f} | {r['state_bytes'] / numel:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(model=args.model, numel=numel, device=str(device), threads=args.threads, rows=rows), f, indent=1
            )


if __name__ == "__main__":
    main()
