"""``benchmarks/gpu_check.sh`` stays runnable on a bare GPU machine: its ``--self-check`` mode runs every step
of the GPU check (the kernels compiled for sm_90 first) at toy sizes on the CPU (Triton's interpreter), in
a Python that looks like the GPU machines' (SPEC section 8): hf_memopt not installed (only the checkout the
script puts on ``PYTHONPATH``), no ``datasets``, no ``evaluate``, no ``deepspeed``, no user site-packages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from executors_available import needs

ROOT = Path(__file__).resolve().parents[1]

#: imported at start-up from PYTHONPATH: drops the editable install's finder (setuptools' ``__editable__``
#: module) and hides the packages the GPU machines do not have (``find_spec`` says None, as for any missing
#: package: ``transformers`` probes for them so)
BARE_SITECUSTOMIZE = """
import importlib.machinery
import sys

BLOCKED = {"datasets", "evaluate", "deepspeed"}


class _PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [
    _PathFinderWithout if f is importlib.machinery.PathFinder else f
    for f in sys.meta_path
    if not getattr(f, "__module__", "").startswith("__editable__")
]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
"""


def _bare_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "bare_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", PYTHON=sys.executable)
    return env


def test_the_bare_python_has_neither_the_package_nor_datasets(tmp_path):
    """The setting of the next test is what it claims (else that test could pass on an installed package)."""
    env = _bare_env(tmp_path)
    for module in ("hf_memopt", "datasets", "evaluate", "deepspeed"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (module, proc.stderr[-500:])
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, transformers, triton"], cwd=tmp_path, env=env, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr[-1000:]


@needs("triton")
def test_the_gpu_check_script_runs_end_to_end_on_a_bare_python(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--self-check", str(out)],
        cwd=tmp_path,
        env=_bare_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:] + proc.stderr[-2000:]
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert [s.split(".")[0] for s in sections] == ["0", "1", "2a", "2b", "2c", "3", "4"]
    assert text.count("exit 0,") == 7
    assert re.search(r"\| decide \| sm_90 \| [0-9.]+ \| \d+ \| 0 \|", text)  # the kernels compiled for the GPU
    assert re.search(r"\| memopt_adamw topc=2 fp32 \[triton\] \| [0-9.]+ \|", text)  # the executor that ran
    assert re.search(r"\| memopt_adamw \| [0-9.]+ \| [0-9.]+ \|", text)  # the Trainer row
    # the offload section: without deepspeed it says so and runs FSDP2 CPUOffloadPolicy on the "cpu" executor
    assert "skipped: deepspeed not installed on this machine" in text
    assert re.search(r'"engine": "fsdp2", "optimizer": "memopt_adamw", "offload": true, .*"executor": "cpu"', text)
    assert re.search(r'"optimizer": "adamw_torch", "offload": true', text)
    assert "offload_step: OK" in text


def test_the_gpu_checks_time_limits_add_up_to_seven_minutes_at_most(tmp_path):
    """Issue 21: the GPU run's worst case (the sum of its sections' timeouts) is at most 7 minutes, whichever
    offload engine section 4 picks. Read from the limits the script really passes to ``timeout`` in its GPU
    mode, with a ``timeout`` on ``PATH`` that records its limit and runs nothing."""
    import importlib.util

    fake = tmp_path / "bin" / "timeout"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$1" >>"$LIMITS"\n')
    fake.chmod(0o755)
    for name, env, engine in (
        ("bare", _bare_env(tmp_path), "FSDP2"),  # the GPU machines: no deepspeed
        (
            "installed",
            {**os.environ, "PYTHON": sys.executable},
            "DeepSpeed" if importlib.util.find_spec("deepspeed") else "FSDP2",
        ),
    ):
        limits, out = tmp_path / f"limits_{name}", tmp_path / f"results_{name}.md"
        env = {**env, "PATH": f"{fake.parent}:{os.environ['PATH']}", "LIMITS": str(limits)}
        proc = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        seconds = [int(x) for x in limits.read_text().split()]
        assert len(seconds) == 7, seconds  # sections 0, 1, 2a, 2b, 2c, 3, 4
        assert sum(seconds) <= 420, seconds
        assert re.search(rf"^## 4\. optimizer offload to CPU, 1\.01B parameters: {engine}", out.read_text(), re.M)
