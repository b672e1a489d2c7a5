"""``benchmarks/gpu_check.sh`` stays runnable: its ``--self-check`` mode runs every step of the GPU check
at toy sizes on the CPU (Triton's interpreter) and must write a results file with every section passed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from hf_memopt.engine.executors import triton as triton_executor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not triton_executor.runs_on(torch.device("cpu")), reason="Triton cannot run CPU tensors here")
def test_the_gpu_check_script_runs_end_to_end(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--self-check", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:]
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert [s.split(".")[0] for s in sections] == ["1", "2a", "2b", "2c", "3"]
    assert text.count("exit 0,") == 5
    assert re.search(r"\| memopt_adamw topc=2 fp32 \[triton\] \| [0-9.]+ \|", text)  # the executor that ran
    assert re.search(r"\| memopt_adamw \| [0-9.]+ \| [0-9.]+ \|", text)  # the Trainer row
