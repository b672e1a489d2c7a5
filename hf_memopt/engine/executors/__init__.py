"""Executors: implementations of the step rule for a batch of param groups, and the one place that picks them.

* ``"torch"`` (:mod:`.torch`): torch ops on any device, multi-tensor; decisions on the host.
* ``"cpu"`` (:mod:`.cpu`): the C kernel, Adam/AdamW and Critical Momenta on contiguous fp32 CPU tensors.
* ``"triton"`` (:mod:`.triton`): the GPU engine, decisions on the device and no host synchronisation
  (CUDA tensors; CPU tensors under Triton's interpreter). Triton is imported only when it runs.

An executor owns deciding and updating for the groups it runs: ``run(opt, works)`` gets the step's
works (param group, its torch ``_init_group`` lists, its base update and, when it decides on the
host, the host plan) and leaves parameters, state and ledgers updated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .cpu import CpuExecutor
from .torch import TorchExecutor
from .triton import TritonExecutor

logger = logging.getLogger("hf_memopt")


class Executor(Protocol):
    """What the step (:func:`hf_memopt.engine.step.run_step`) asks of an executor, per param group ("work").

    An executor that keeps raw addresses between steps keys what it caches on ``work.view`` (the group's
    state as :mod:`hf_memopt.engine.guard` validated it this step) and judges a new view once, in
    :meth:`unavailable`; see docs/design.md, "What an executor may cache".
    """

    #: "torch", "cpu" or "triton": what ``optimizer.executor_for(group)`` reports
    name: str

    def unavailable(self, opt: Any, work: Any) -> str | None:
        """Why it cannot run ``work`` this step, in words (None: it can). Reads no device value."""

    def decides_on_host(self, opt: Any, work: Any) -> bool:
        """Whether ``work`` takes a host plan (:mod:`hf_memopt.engine.plan`) instead of deciding itself."""

    def prepare(self, opt: Any, works: Sequence[Any]) -> None:
        """Before the decisions (Critical Momenta advances its momenta: what is stored and tested)."""

    def run(self, opt: Any, works: Sequence[Any]) -> None:
        """Aggregate, admit, commit the decisions, then the base update, for every work it was picked for."""


#: The values of the ``executor`` argument.
EXECUTOR_CHOICES = ("auto", "torch", "cpu", "triton")

TORCH = TorchExecutor()
CPU = CpuExecutor()
TRITON = TritonExecutor()
_BY_NAME = {"torch": TORCH, "cpu": CPU, "triton": TRITON}
_logged_no_triton = False


def check_executor_name(value: Any) -> str:
    """``value`` if it is a valid ``executor`` argument, else a ``ValueError`` naming the choices."""
    if value not in EXECUTOR_CHOICES:
        raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTOR_CHOICES))}; got {value!r}")
    return value


def select_executor(requested: str, opt: Any, work: Any) -> Executor:
    """The executor that runs ``work`` (one param group) in this step.

    ``requested`` is the optimizer's ``executor`` argument:

    * ``"auto"``: memory off (kappa=0): "torch" (torch's own optimizer, nothing else to do); CUDA
      parameters: "triton" when Triton imports (else "torch", said once at INFO); CPU: "cpu" when it
      can run the group (Adam/AdamW/Critical Momenta, fp32 contiguous tensors, no foreach/fused flag,
      numbers for lr and betas, fp32 or bf16 memory, the kernel builds), else "torch".
      ``capturable=True`` with the memory on needs decisions on the device: "triton" or an error;
    * ``"torch"``, ``"cpu"``, ``"triton"``: that one, or ``ValueError`` saying why it cannot run the group;
      a group with the memory off runs torch's own optimizer under "triton" (it has nothing to decide;
      ``executor_for`` says "torch"), and is an error under "cpu" (whose kernel is the memory's update).
    """
    if requested == "auto":
        if work.cfg.kappa == 0.0:
            return TORCH
        if work.group.get("capturable"):
            return _checked("triton", opt, work, why="capturable=True with the memory on needs executor='triton'")
        if _on_cuda(work):
            reason = TRITON.unavailable(opt, work)
            if reason is None:
                return TRITON
            _log_no_triton(reason)
            return TORCH
        return CPU if CPU.unavailable(opt, work) is None else TORCH
    if requested == "triton" and work.cfg.kappa == 0.0:
        return TORCH
    return _checked(requested, opt, work)


def _checked(name: str, opt: Any, work: Any, why: str | None = None) -> Any:
    executor = _BY_NAME[name]
    reason = executor.unavailable(opt, work)
    if reason is not None:
        prefix = f"{why}, which " if why else f"executor={name!r} "
        raise ValueError(f"{prefix}cannot run param group {work.index}: {reason}")
    return executor


def _on_cuda(work: Any) -> bool:
    params = work.lists["params"] or work.group["params"]
    return bool(params) and getattr(params[0], "is_cuda", False)


def _log_no_triton(reason: str) -> None:
    global _logged_no_triton
    if not _logged_no_triton:
        _logged_no_triton = True
        logger.info("hf_memopt: CUDA parameters run on the 'torch' executor: %s", reason)


__all__ = [
    "CPU",
    "EXECUTOR_CHOICES",
    "Executor",
    "TORCH",
    "TRITON",
    "CpuExecutor",
    "TorchExecutor",
    "TritonExecutor",
    "check_executor_name",
    "select_executor",
]
