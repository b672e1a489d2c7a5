"""Compile every launch of the "triton" executor for a GPU, without a GPU (SPEC section 8).

Triton's interpreter accepts code that its GPU compiler rejects, so the interpreter tests alone do not
prove that the kernels run on a GPU. This module closes that gap in two steps:

1. :func:`record_launches` runs the executor under the interpreter (``TRITON_INTERPRET=1``, CPU
   tensors) over a matrix of optimizers, dtypes, ``topc``, keys, a norm reducer, param groups and
   multi-chunk tensors, and records each distinct launch as Triton would specialise it: the kernel,
   each argument's kind (a tensor's dtype and whether its address is 16-byte aligned; an int's class:
   1, a multiple of 16, other; 32 or 64 bits), the constexprs and the launch options;
2. :func:`compile_launches` (in a process where the interpreter is off: ``@triton.jit`` picks interpreted
   or compiled kernels when the kernel module is imported) installs a driver object that reports a
   ``GPUTarget("cuda", arch, 32)`` and calls ``kernel.warmup(...)`` for each launch: the same compile a
   launch would make, down to ptxas (shipped in the triton wheel). ``cuobjdump --dump-resource-usage``
   (also in the wheel) reports registers and spills (``LOCAL``/``STACK`` bytes).

As a script (what ``benchmarks/gpu_check.sh`` and CI run)::

    python tests/triton_compile.py [--arch 90 80] [--triton-path DIR]

records, compiles in a subprocess (with ``DIR``, a ``pip install --target`` folder holding another
Triton, first on its path), prints a table and exits 1 on any compile error or spill.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("norm_partials", "unit_sums", "decide", "apply")

# -- 1. recording (under the interpreter) ---------------------------------------------------------------

#: one optimizer per row: its class, its base hyperparameters and its param groups' own settings
_TOPC = (1, 2, 3, 5, 10, 20)  # every BLOCK_C the host picks (next power of two: 1 .. 32)
_BUFFERS = (None, "bf16", "fp16")


def _group_options(name: str) -> list[dict[str, Any]]:
    """fp32 param group settings that reach every specialisation of the launches: topc 1..20, buffer dtypes,
    both keys, and for Adam/AdamW every flag of the in-kernel update (amsgrad, maximize, weight decay)."""
    groups = []
    for i, topc in enumerate(_TOPC):
        groups.append(dict(topc=topc, buffer_dtype=_BUFFERS[i % 3], key=("group", "tensor")[i % 2], decay=0.8))
    if name in ("MemoryAugmentedAdamW", "MemoryAugmentedAdam"):
        groups += [
            dict(topc=2, amsgrad=True, maximize=True, weight_decay=0.0),
            dict(topc=4, amsgrad=True, weight_decay=0.1),
            dict(topc=2, maximize=True, weight_decay=0.1, buffer_dtype="bf16"),
        ]
    return groups


_BASE = {
    "MemoryAugmentedAdamW": dict(lr=1e-2, weight_decay=0.1),
    "MemoryAugmentedAdam": dict(lr=1e-2, weight_decay=0.05),
    "MemoryAugmentedSGD": dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
    "MemoryAugmentedRMSprop": dict(lr=1e-3, momentum=0.5, centered=True),
    "CriticalMomentaAdamW": dict(lr=1e-2, weight_decay=0.1),
}

#: tensor shapes per group (cycled): one tensor, several, and one of three 16K-element chunks
_SHAPES = ([(40000,)], [(7, 5), (16,)], [(33,)], [(8, 8), (3,), (24,)])


def _scenarios() -> list[tuple[str, list[tuple[dict[str, Any], list[tuple[int, ...]]]], bool, Any]]:
    """(optimizer, param groups as (options, shapes), norm reducer or not, dtype of the params)."""
    import torch

    out = []
    for name in _BASE:
        groups = [(opts, _SHAPES[i % len(_SHAPES)]) for i, opts in enumerate(_group_options(name))]
        out.append((name, groups, False, torch.float32))
        for i, dtype in enumerate((torch.bfloat16, torch.float16)):  # every buffer dtype under each
            groups = [
                (dict(topc=2 + j, buffer_dtype=b, key=("group", "tensor")[j % 2]), _SHAPES[(i + j) % len(_SHAPES)])
                for j, b in enumerate(("fp32", "bf16", "fp16"))
            ]
            out.append((name, groups, False, dtype))
    for name in ("MemoryAugmentedAdamW", "CriticalMomentaAdamW"):  # a norm reducer: the sharded path
        out.append((name, [(dict(topc=3, key="tensor"), _SHAPES[1]), (dict(topc=20), _SHAPES[0])], True, torch.float32))
    # a GPT-2-sized group: 148 tensors (BLOCK_U 128, the widest ledger tile)
    for topc, key in ((20, "tensor"), (10, "group")):
        out.append(("MemoryAugmentedAdamW", [(dict(topc=topc, key=key), [(4,)] * 148)], False, torch.float32))
    return out


def _int_class(v: int) -> int:
    """A stand-in for ``v`` that Triton specialises alike: 1, a multiple of 16 or not; 32 or 64 bits."""
    if v == 1:
        return 1
    base = 16 if v % 16 == 0 else 3
    return base if -(2**31) <= v < 2**31 else base + 2**33


def _arg_spec(arg: Any, plain: bool = False) -> Any:
    """What Triton specialises a launch on, for one argument (``plain``: an int it does not specialise,
    except on its width)."""
    import torch

    if plain and isinstance(arg, int) and not isinstance(arg, bool):
        return ["int", 3 if -(2**31) <= arg < 2**31 else 3 + 2**33]

    if isinstance(arg, torch.Tensor):
        return ["tensor", str(arg.dtype).removeprefix("torch."), arg.data_ptr() % 16 == 0]
    if isinstance(arg, bool):
        return ["bool", arg]
    if isinstance(arg, int):
        return ["int", _int_class(arg)]
    if isinstance(arg, float):
        return ["float"]
    raise TypeError(f"unexpected kernel argument {type(arg).__name__}")


def _kw_spec(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return {"dtype": str(value)}  # a tl.dtype constexpr (its name: fp32, bf16, fp16)


def record_launches(scenarios: list | None = None, steps: int = 1) -> list[dict[str, Any]]:
    """Run the executor over ``scenarios`` (default: the module's matrix) under Triton's interpreter and
    return each distinct launch (kernel, argument specs, constexprs and options), sorted."""
    import torch
    from streams import gradient_stream

    import hf_memopt
    from hf_memopt.engine.executors import triton_runtime

    k = triton_runtime.kernels()
    if k is None or not triton_runtime.runs_on(torch.device("cpu")):
        raise RuntimeError("recording needs Triton's interpreter (TRITON_INTERPRET=1 before the first import)")
    seen: dict[str, dict[str, Any]] = {}
    originals = {name: getattr(k, name) for name in KERNELS}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                kernel = originals[self.name]
                plain = set(kernel.kwargs.get("do_not_specialize") or ())  # ints Triton does not specialise on
                spec = {
                    "kernel": self.name,
                    "args": [_arg_spec(a, name in plain) for a, name in zip(args, kernel.arg_names)],
                    "kwargs": {key: _kw_spec(v) for key, v in sorted(kwargs.items())},
                }
                seen.setdefault(json.dumps(spec, sort_keys=True), spec)
                return originals[self.name][grid](*args, **kwargs)

            return launch

    for name in KERNELS:
        setattr(k, name, Recorder(name))
    try:
        for name, groups, reducer, dtype in scenarios if scenarios is not None else _scenarios():
            gen = torch.Generator().manual_seed(0)
            params, param_groups = [], []
            for opts, shapes in groups:
                ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
                params.append((ps, shapes))
                param_groups.append({"params": ps, **opts})
            opt = getattr(hf_memopt, name)(param_groups, executor="triton", **_BASE[name])
            if reducer:
                opt.norm_reducer = lambda units, sq: sq  # the sharded path, on one rank
            streams = [gradient_stream(steps, dtype, shapes=shapes, skip_every=0) for _ps, shapes in params]
            for _ in range(steps):
                for (ps, _shapes), stream in zip(params, streams):
                    for p, g in zip(ps, next(stream)):
                        p.grad = g
                opt.step()
            assert all(opt.executor_for(i) == "triton" for i in range(len(param_groups))), name
    finally:
        for name, kernel in originals.items():
            setattr(k, name, kernel)
    return [seen[key] for key in sorted(seen)]


# -- 2. compiling (interpreter off, a driver that reports a GPU) -------------------------------------------


class _TargetDriver:
    """The parts of a Triton driver that ``warmup`` reads: the target and a current device and stream."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # Triton caches compiled kernels per device: one "device" per target

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _wheel_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_report(log: str) -> dict[str, int]:
    """Spill stores and stack frame bytes from ptxas's ``-v`` report (which Triton prints under
    ``TRITON_DUMP_PTXAS_LOG=1``): a stack frame alone is not a spill."""
    out = {}
    for key, pattern in (("spill", r"(\d+) bytes spill stores"), ("stack", r"(\d+) bytes stack frame")):
        found = re.findall(pattern, log)
        if found:
            out[key] = int(found[-1])
    return out


def _resources(cubin: bytes, workdir: Path) -> dict[str, int]:
    """Registers and local memory bytes of a cubin's one function, from cuobjdump (in the wheel)."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run(
        [_wheel_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def _build_args(specs: list[Any], keep: list[Any]) -> list[Any]:
    """Stand-in arguments that Triton specialises like the recorded ones (CPU tensors: only their dtype
    and address are read)."""
    import torch

    out = []
    for spec in specs:
        kind = spec[0]
        if kind == "tensor":
            dtype = getattr(torch, spec[1])
            size = torch.empty((), dtype=dtype).element_size()
            raw = torch.empty(256, dtype=torch.uint8)
            keep.append(raw)
            start = (-raw.data_ptr()) % 16 + (0 if spec[2] else size)  # aligned, or one element off
            out.append(raw[start : start + 16 * size].view(dtype))
        elif kind == "int":
            out.append(spec[1])
        elif kind == "float":
            out.append(0.5)
        else:
            out.append(spec[1])
    return out


def _ptx_vector_ops(ptx: str) -> list[str]:
    return sorted(set(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9]+)*\.v[248]\.[a-z0-9]+", ptx)))


def compile_launches(launches: list[dict[str, Any]], arch: int) -> list[dict[str, Any]]:
    """Compile each launch for ``sm_<arch>``; per launch: the error, or registers, spills and the vector
    loads and stores in its PTX. Needs the interpreter off when the kernel module is first imported."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (it is read when the kernels are imported)")
    import triton
    import triton.language as tl
    from triton.runtime.driver import driver

    from hf_memopt.engine.executors import triton_kernels as k

    driver.set_active(_TargetDriver(arch))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for launch in launches:
            keep: list[Any] = []
            args = _build_args(launch["args"], keep)
            kwargs = {key: (tl.dtype(v["dtype"]) if isinstance(v, dict) else v) for key, v in launch["kwargs"].items()}
            row: dict[str, Any] = {"kernel": launch["kernel"], "arch": arch, "triton": triton.__version__}
            row["constexprs"] = {key: v for key, v in launch["kwargs"].items()}
            start = time.perf_counter()
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    compiled = getattr(k, launch["kernel"]).warmup(*args, grid=(1,), **kwargs)
            except Exception as exc:  # every compile error, reported with the launch that raised it
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            else:
                row.update(_resources(compiled.asm["cubin"], Path(tmp)))
                row.update(_ptxas_report(log.getvalue()))
                row["vector_ops"] = _ptx_vector_ops(compiled.asm["ptx"])
                row["num_warps"] = compiled.metadata.num_warps
            row["seconds"] = round(time.perf_counter() - start, 3)
            results.append(row)
    return results


def compile_in_subprocess(
    launches: list[dict[str, Any]], archs: list[int], triton_path: str | None = None, timeout: float = 600
) -> list[dict[str, Any]]:
    """:func:`compile_launches` for each arch in fresh Pythons with the interpreter off (``triton_path``, a
    folder holding another Triton, first on their path), one per arch and share of the launches, as many
    processes as there are cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT), str(ROOT / "tests")]
    if triton_path:
        paths.insert(0, str(triton_path))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas's register and spill report, on stdout
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh kernel cache: every launch is compiled (a cached kernel would bring no ptxas report)
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        # processes side by side: one per arch and share of the launches, as many as there are cores
        shares = max(1, min(len(launches), (os.cpu_count() or 1) // len(archs)))
        children = []
        for arch in archs:
            for share in range(shares):
                src = Path(tmp) / f"launches-{share}.json"
                src.write_text(json.dumps(launches[share::shares]))
                dst = Path(tmp) / f"results-{arch}-{share}.json"
                cmd = [
                    sys.executable,
                    str(Path(__file__)),
                    "--compile",
                    str(src),
                    "--out",
                    str(dst),
                    "--arch",
                    str(arch),
                ]
                children.append((dst, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        results = []
        try:
            for dst, proc in children:
                _out, err = proc.communicate(timeout=timeout)
                if proc.returncode != 0 or not dst.exists():
                    raise RuntimeError(f"the compile process failed (exit {proc.returncode}):\n{err.decode()[-4000:]}")
                results += json.loads(dst.read_text())
        finally:
            for _dst, proc in children:  # none outlives a failure or a timeout
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return results


def problems(results: list[dict[str, Any]]) -> list[str]:
    """Compile errors and spills, one line each (empty: every launch compiled without spilling)."""
    out = []
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} (triton {r['triton']}) {r['constexprs']}"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
        elif "spill" not in r:
            out.append(f"{where}: no ptxas report (a kernel from Triton's cache?): spills unknown")
        elif r["spill"] or r.get("local", 0):
            out.append(f"{where}: spills ({r['spill']} bytes spill stores, {r.get('local', 0)} bytes local)")
    return out


def table(results: list[dict[str, Any]]) -> str:
    """Per kernel, arch and Triton: launches compiled, registers (min-max), spill bytes (max), vector ops."""
    rows: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["kernel"], r["arch"], r["triton"]), []).append(r)
    lines = [
        "| kernel | arch | triton | launches | errors | registers | spill bytes | compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kernel, arch, version), rs in sorted(rows.items()):
        ok = [r for r in rs if "error" not in r]
        regs = sorted(r["reg"] for r in ok)
        spills = max((r.get("spill", 0) for r in ok), default=0)
        span = f"{regs[0]}-{regs[-1]}" if regs else "-"
        seconds = sum(r["seconds"] for r in rs)
        lines.append(
            f"| {kernel} | sm_{arch} | {version} | {len(rs)} | {len(rs) - len(ok)} | {span} | {spills} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90: H100)")
    parser.add_argument("--triton-path", help="a folder holding another Triton (pip install --target), put first")
    parser.add_argument("--compile", help=argparse.SUPPRESS)  # the child: a launches file to compile
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile:
        launches = json.loads(Path(args.compile).read_text())
        results = [r for arch in args.arch for r in compile_launches(launches, arch)]
        Path(args.out).write_text(json.dumps(results))
        return 0
    start = time.perf_counter()
    launches = record_launches()
    recorded = time.perf_counter() - start
    results = compile_in_subprocess(launches, args.arch, args.triton_path)
    print(table(results))
    print(
        f"\n{len(launches)} distinct launches recorded in {recorded:.1f} s; compiled in {time.perf_counter() - start - recorded:.1f} s"
    )
    found = problems(results)
    for line in found:
        print(line)
    if found:
        print("\nThe Triton kernels do not compile cleanly for the GPU: fix them before running anything on one.")
        return 1
    return 0


if __name__ == "__main__":
    if "--compile" not in sys.argv:  # recording runs the executor under the interpreter, on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    sys.exit(main())
