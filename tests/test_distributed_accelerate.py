"""`accelerate launch` smoke tests on CPU: the DDP and a DeepSpeed config of examples/accelerate/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dist_utils as du
import pytest

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "accelerate"


def _launch(config: str) -> str:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    }
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLE / config)]
    cmd += ["--num_processes", "2", "--main_process_port", str(du.free_port()), str(EXAMPLE / "train_tiny.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(("config", "kind"), [("ddp.yaml", "MULTI_CPU"), ("zero2.yaml", "DEEPSPEED")])
def test_accelerate_launch_trains(config: str, kind: str) -> None:
    pytest.importorskip("accelerate")
    if kind == "DEEPSPEED":
        pytest.importorskip("deepspeed")
    out = _launch(config)
    # Both ranks print to one pipe: their lines may interleave, so match anywhere in the output.
    reports = re.findall(r"rank (\d)/(\d) (?:DistributedType\.)?(\w+): loss \S+ fill (\S+)", out)
    assert sorted((r, n) for r, n, _, _ in reports) == [("0", "2"), ("1", "2")], out[-2000:]
    assert all(k == kind and fill == "1.00" for _, _, k, fill in reports), reports
