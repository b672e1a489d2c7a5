"""Executors: implementations of the step rule for a batch of param groups, and the one place that picks them.

* ``"torch"`` (:mod:`.torch`): torch ops on any device, multi-tensor; decisions on the host.
* ``"cpu"`` (:mod:`.cpu`): the C kernel, Adam/AdamW and Critical Momenta on contiguous fp32 CPU tensors.
* ``"triton"``: the GPU engine (decisions on the device, no host synchronisation); not in this
  release: asking for it is a ``ValueError``.

An executor owns deciding and updating for the groups it runs: ``run(opt, works)`` gets the step's
works (param group, its torch ``_init_group`` lists, its base update and, when it decides on the
host, the host plan) and leaves parameters, state and ledgers updated.
"""

from __future__ import annotations

from typing import Any

from .cpu import CpuExecutor
from .torch import TorchExecutor

#: The values of the ``executor`` argument.
EXECUTOR_CHOICES = ("auto", "torch", "cpu", "triton")

TORCH = TorchExecutor()
CPU = CpuExecutor()
_BY_NAME = {"torch": TORCH, "cpu": CPU}


def check_executor_name(value: Any) -> str:
    """``value`` if it is a valid ``executor`` argument, else a ``ValueError`` naming the choices."""
    if value not in EXECUTOR_CHOICES:
        raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTOR_CHOICES))}; got {value!r}")
    if value == "triton":
        raise ValueError(
            "executor='triton': the Triton GPU engine is not part of this release; use executor='auto', "
            "'torch' (any device) or 'cpu' (Adam/AdamW on fp32 CPU tensors)"
        )
    return value


def select_executor(requested: str, opt: Any, work: Any) -> TorchExecutor | CpuExecutor:
    """The executor that runs ``work`` (one param group) in this step.

    ``requested`` is the optimizer's ``executor`` argument:

    * ``"auto"``: memory off (kappa=0): "torch" (torch's own optimizer, nothing else to do); else
      "cpu" when it can run the group (Adam/AdamW/Critical Momenta, fp32 contiguous CPU tensors, no foreach/fused
      flag, numbers for lr and betas, fp32 or bf16 memory, the kernel builds), else "torch";
    * ``"torch"``: always;
    * ``"cpu"``: when it can run the group, else ``ValueError`` saying why.
    """
    if requested == "auto":
        if work.cfg.kappa == 0.0 or CPU.unavailable(opt, work) is not None:
            return TORCH
        return CPU
    executor = _BY_NAME[requested]
    reason = executor.unavailable(opt, work)
    if reason is not None:
        raise ValueError(f"executor={requested!r} cannot run param group {work.index}: {reason}")
    return executor


__all__ = ["CPU", "EXECUTOR_CHOICES", "TORCH", "CpuExecutor", "TorchExecutor", "check_executor_name", "select_executor"]
