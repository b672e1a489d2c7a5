"""The base updates: how each torch optimizer's own update runs on the aggregated gradients.

A strategy names the lists torch's ``_init_group`` fills for its optimizer and calls torch's
functional update (for-loop, foreach or fused, as the group's flags ask) with the aggregate in
place of the gradient. The "torch" executor knows nothing else of the base optimizer. The "cpu" and
"triton" executors implement Adam's update themselves: they read Adam's state and hyperparameters
(through :meth:`AdamUpdate.kernel_args`, and the Triton layout through the group and the lists) and
run only the groups whose strategy says ``cpu_kernel``.

Critical Momenta (SPEC section 1b) stores and aggregates the *momentum*, not the gradient, so it
cannot run as "aggregate g, then the base update". Its strategy says so with
``stores_momentum = True`` and splits the AdamW step around the memory's part: :meth:`
CriticalMomentaUpdate.advance` (step count, decoupled decay, ``m <- lerp(m, g, 1 - beta1)``) runs
before the admission decisions, so that the castability test of SPEC section 1.3 sees the value that
is stored; :meth:`CriticalMomentaUpdate.finish` (second moment and parameter update from the
aggregate ``m~``) after them. Executors that run it read ``memory_source`` (the list whose values
are aggregated and stored: ``"exp_avgs"`` instead of ``"grads"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam
from torch.optim.rmsprop import rmsprop as _rmsprop
from torch.optim.sgd import sgd as _sgd

Lists = dict[str, list[Any]]


class BaseUpdate:
    """One torch optimizer's update on a list of (aggregated) gradients."""

    #: names of torch's ``_init_group`` output lists, in its argument order (after ``group``)
    list_names: tuple[str, ...] = ()
    #: this update has an implementation in the CPU kernel (``executor="cpu"``)
    cpu_kernel: bool = False
    #: the memory stores and aggregates the momentum (Critical Momenta, SPEC 1b), not the gradient
    stores_momentum: bool = False
    #: the ``_init_group`` list whose values the memory aggregates and stores
    memory_source: str = "grads"
    #: the state key each per-parameter ``_init_group`` list reads (``lists[name][i] is state[p_i][key]``):
    #: what :mod:`hf_memopt.engine.snapshot` checks to reuse last step's lists
    state_keys: dict[str, str] = {}

    def update(self, opt: Any, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        """Run the base update of ``group`` on ``lists`` (its ``"grads"`` holds the aggregates)."""
        raise NotImplementedError


@dataclass
class AdamKernelArgs:
    """What the CPU kernel needs of an Adam/AdamW group: its state lists and hyperparameters."""

    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty without amsgrad
    steps: list[Tensor]
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    maximize: bool
    decoupled: bool
    momentum: bool = False  # Critical Momenta: the memory holds m, m~ = m + kappa S / n feeds v and p

    def bias_corrections(self, step: float) -> tuple[float, float]:
        """``(lr / (1 - beta1^t), sqrt(1 - beta2^t))`` at step ``t``, in Python floats as torch's single-tensor
        Adam computes them (the kernels take these, not the powers)."""
        return self.lr / (1 - self.beta1**step), (1 - self.beta2**step) ** 0.5


class AdamUpdate(BaseUpdate):
    """``torch.optim.Adam`` / ``AdamW`` (decoupled decay is the group's ``decoupled_weight_decay``)."""

    list_names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    state_keys = {
        "exp_avgs": "exp_avg",
        "exp_avg_sqs": "exp_avg_sq",
        "max_exp_avg_sqs": "max_exp_avg_sq",
        "state_steps": "step",
    }
    cpu_kernel = True

    def update(self, opt: Any, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        beta1, beta2 = group["betas"]
        _adam(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"],
            lists["state_steps"],
            amsgrad=group["amsgrad"],
            has_complex=extra,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    @staticmethod
    def kernel_unavailable(group: dict[str, Any]) -> str | None:
        """Why a kernel (the C one, or Triton's in-pass update) cannot stand in for torch's update of ``group``
        (None: it can): it replaces torch's default choice only (no ``foreach``/``fused`` request, not
        capturable or differentiable), and reads lr and betas as numbers."""
        for flag in ("foreach", "fused"):
            if group.get(flag) is not None:
                return f"{flag}={group[flag]} asks for torch's own implementation"
        for flag in ("capturable", "differentiable"):
            if group.get(flag):
                return f"{flag}=True is a torch implementation flag the kernels do not have"
        if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
            return "lr and betas must be Python numbers"
        return None

    def kernel_args(self, group: dict[str, Any], lists: Lists) -> AdamKernelArgs:
        beta1, beta2 = group["betas"]
        return AdamKernelArgs(
            exp_avgs=lists["exp_avgs"],
            exp_avg_sqs=lists["exp_avg_sqs"],
            max_exp_avg_sqs=lists["max_exp_avg_sqs"],
            steps=lists["state_steps"],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            decoupled=bool(group.get("decoupled_weight_decay", False)),
        )


class SGDUpdate(BaseUpdate):
    """``torch.optim.SGD``: momentum, dampening, nesterov, coupled L2."""

    list_names = ("params", "grads", "momentum_buffer_list")
    state_keys = {"momentum_buffer_list": "momentum_buffer"}

    def update(self, opt: Any, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        params, buffers = lists["params"], lists["momentum_buffer_list"]
        _sgd(
            params,
            lists["grads"],
            buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=bool(extra),  # sparse gradients: only with the memory off (kappa=0), as torch's SGD
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if group["momentum"] != 0:
            # torch's functional SGD creates the momentum buffers on the first step
            for p, buf in zip(params, buffers):
                opt.state[p]["momentum_buffer"] = buf


class RMSpropUpdate(BaseUpdate):
    """``torch.optim.RMSprop``: alpha, centered, momentum, coupled L2."""

    list_names = ("params", "grads", "square_avgs", "momentum_buffer_list", "grad_avgs", "state_steps")
    state_keys = {
        "square_avgs": "square_avg",
        "momentum_buffer_list": "momentum_buffer",
        "grad_avgs": "grad_avg",
        "state_steps": "step",
    }

    def update(self, opt: Any, group: dict[str, Any], lists: Lists, extra: Any) -> None:
        _rmsprop(
            lists["params"],
            lists["grads"],
            lists["square_avgs"],
            lists["grad_avgs"],
            lists["momentum_buffer_list"],
            lists["state_steps"],
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=extra,
        )


class CriticalMomentaUpdate(AdamUpdate):
    """AdamW whose memory holds momenta (Critical Momenta, SPEC section 1b).

    With the memory off (kappa=0) :meth:`update` is torch's own AdamW, every flag honoured. With it
    on, the executor calls :meth:`advance`, decides and admits ``m``, builds ``m~`` and calls
    :meth:`finish`. Both are multi-tensor ``torch._foreach_*`` calls whose per-tensor arithmetic is
    torch's single-tensor AdamW (same ops, same order, same Python-float scalars), so with an empty
    memory (``m~ = m``) a step equals ``torch.optim.AdamW(foreach=False)`` bit for bit on CPU.
    """

    stores_momentum = True
    memory_source = "exp_avgs"

    def advance(self, group: dict[str, Any], lists: Lists) -> None:
        """SPEC 1b step 2 for every tensor of ``lists``: ``step += 1``, ``p *= 1 - lr wd``, ``m.lerp_(g, 1 - beta1)``."""
        params, grads, exp_avgs = lists["params"], lists["grads"], lists["exp_avgs"]
        if not params:
            return
        lr, beta1 = _lr(group), _number(group["betas"][0])
        torch._foreach_add_(lists["state_steps"], 1)
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            # a tensor lr (capturable) stays a tensor: reading it would synchronise
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)

    def finish(self, group: dict[str, Any], lists: Lists, m_tilde: list[Tensor]) -> None:
        """SPEC 1b step 5: ``v``, ``vmax`` and ``p`` from ``m_tilde`` (aligned with ``lists["params"]``)."""
        params = lists["params"]
        if not params:
            return
        beta1, beta2 = _number(group["betas"][0]), _number(group["betas"][1])
        v = lists["exp_avg_sqs"]
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, m_tilde, m_tilde, 1 - beta2)
        if group["amsgrad"]:
            torch._foreach_maximum_(lists["max_exp_avg_sqs"], v)
            v = lists["max_exp_avg_sqs"]
        denom = torch._foreach_sqrt(v)
        steps = lists["state_steps"]
        if group["capturable"] or group["fused"]:
            # torch keeps the step counters on the parameters' device: the bias corrections are computed
            # there too (in fp32, as torch's capturable AdamW does), nothing is read on the host
            bc1 = torch._foreach_pow(beta1, steps)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1)  # 1 - beta1^t
            bc2 = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1)
            torch._foreach_sqrt_(bc2)  # sqrt(1 - beta2^t)
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_mul_(denom, bc1)
            ratio = torch._foreach_div(m_tilde, denom)
            torch._foreach_mul_(ratio, _lr(group))
            torch._foreach_sub_(params, ratio)
            return
        # torch's single-tensor AdamW takes the step as a Python number (step_t.item()); the counters are
        # CPU tensors here, read in one call
        t = torch.stack([s.reshape(()) for s in steps]).tolist()
        torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in t])
        torch._foreach_add_(denom, group["eps"])
        lr = _lr(group)
        if isinstance(lr, Tensor):  # a tensor lr stays one (reading it could wait for a device)
            ratio = torch._foreach_div(m_tilde, denom)
            torch._foreach_mul_(ratio, [1 / (1 - beta1**s) for s in t])
            torch._foreach_mul_(ratio, lr)
            torch._foreach_sub_(params, ratio)
            return
        torch._foreach_addcdiv_(params, m_tilde, denom, [-(lr / (1 - beta1**s)) for s in t])

    def kernel_args(self, group: dict[str, Any], lists: Lists) -> AdamKernelArgs:
        args = super().kernel_args(group, lists)
        args.momentum = True
        return args


def _lr(group: dict[str, Any]) -> Any:
    """The group's lr as the multi-tensor ops take it: a number, or a 0-dim tensor (torch accepts a tensor lr of
    any shape holding one element, e.g. ``[1]`` or ``[1, 1]``; ``torch._foreach_mul_`` takes only 0-dim ones)."""
    lr = group["lr"]
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() else lr


def _number(x: Any) -> float:
    """A hyperparameter as a Python float (a tensor lr or beta is read once)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


ADAM = AdamUpdate()
CRITICAL_MOMENTA = CriticalMomentaUpdate()
SGD = SGDUpdate()
RMSPROP = RMSpropUpdate()
