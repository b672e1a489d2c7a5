"""The sharding auto-detection in one process: its log, its off switch, its per-optimizer warnings, its imports.

The multi-process behaviour (what it finds under DDP, FSDP1/2 and DeepSpeed, with the switch on
and off) is tested in the ``test_distributed_*`` files, inside their existing spawned runs.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
import torch

from hf_memopt import MemoryAugmentedAdamW
from hf_memopt.distributed import auto


def _optimizer() -> MemoryAugmentedAdamW:
    p = torch.nn.Parameter(torch.randn(4, 3))
    return MemoryAugmentedAdamW([p], topc=2)


def test_first_step_logs_what_it_found_at_info(caplog: pytest.LogCaptureFixture) -> None:
    opt = _optimizer()
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    with caplog.at_level(logging.INFO, logger="hf_memopt.distributed"):
        opt.step()
        opt.step()
    found = [r for r in caplog.records if r.name == "hf_memopt.distributed"]
    assert [(r.levelno, r.getMessage()) for r in found] == [
        (logging.INFO, "MemoryAugmentedAdamW: one process, full tensors: no norm reducer")
    ]
    assert opt.norm_reducer is None


def test_switch_attribute_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = _optimizer()
    monkeypatch.delenv(auto.ENV_VAR, raising=False)
    assert auto.enabled(opt)
    monkeypatch.setenv(auto.ENV_VAR, "0")
    assert not auto.enabled(opt)
    opt.auto_sharding = True
    assert auto.enabled(opt)
    monkeypatch.setenv(auto.ENV_VAR, "1")
    opt.auto_sharding = False
    assert not auto.enabled(opt)


def test_warnings_are_once_per_optimizer_not_per_process() -> None:
    first, second = _optimizer(), _optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto.warn_once(first, "hf_memopt: test message")
        auto.warn_once(first, "hf_memopt: test message")
        auto.warn_once(second, "hf_memopt: test message")
        auto.warn_once(second, "hf_memopt: another message")
    assert [str(w.message) for w in caught] == [
        "hf_memopt: test message",
        "hf_memopt: test message",
        "hf_memopt: another message",
    ]


def test_a_plain_step_imports_no_backend_adapter() -> None:
    code = (
        "import sys, torch\n"
        "from hf_memopt import MemoryAugmentedAdamW\n"
        "p = torch.nn.Parameter(torch.randn(3)); opt = MemoryAugmentedAdamW([p], topc=2)\n"
        "p.grad = torch.randn(3); opt.step()\n"
        "assert 'hf_memopt.distributed.auto' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m in (\n"
        "    'hf_memopt.distributed.deepspeed', 'hf_memopt.distributed.zero', 'hf_memopt.distributed.dtensor',\n"
        "    'torch.distributed.optim')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
