"""The base updates: how each torch optimizer's own update runs on the aggregated gradients.

A strategy names the lists torch's ``_init_group`` fills for its optimizer and calls torch's
functional update (for-loop, foreach or fused, as the group's flags ask) with the aggregate in
place of the gradient. The memory engine knows nothing else of the base optimizer; the one
exception is the CPU kernel, which implements Adam's update itself and reads Adam's state through
:meth:`AdamUpdate.kernel_args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class AdamUpdate(BaseUpdate):
    """``torch.optim.Adam`` / ``AdamW`` (decoupled decay is the group's ``decoupled_weight_decay``)."""

    list_names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
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
            has_sparse_grad=False,
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


ADAM = AdamUpdate()
SGD = SGDUpdate()
RMSPROP = RMSpropUpdate()
