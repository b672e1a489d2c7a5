"""The optimizer section of model cards written by :class:`hf_memopt.trainer.MemOptTrainer`.

The section names the optimizer, lists every hyperparameter that shaped the updates
(from the built optimizer when there is one, so per-run overrides show), the bytes of
optimizer state, and cites the paper. It is delimited by HTML comments so writing the
card again replaces it instead of stacking copies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..config import parse_buffer_dtype
from .optim_args import SPECS, OptimizerSpec, format_value, optim_name, resolve_optim_args

START = "<!-- hf_memopt:optimizer:start -->"
END = "<!-- hf_memopt:optimizer:end -->"

PAPER = (
    'McRae, Parthasarathi, Assran, Chandar, "Memory Augmented Optimizers for Deep Learning", '
    "ICLR 2022, [arXiv:2106.10708](https://arxiv.org/abs/2106.10708)"
)
BIBTEX = """@inproceedings{mcrae2022memory,
  title     = {Memory Augmented Optimizers for Deep Learning},
  author    = {McRae, Paul-Aymeric and Parthasarathi, Prasanna and Assran, Mahmoud and Chandar, Sarath},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2106.10708}
}"""


CM_PAPER = (
    'Malviya, Mordido, Baratin, Babanezhad Harikandeh, Huang, Lacoste-Julien, Pascanu, Chandar, "Promoting '
    'Exploration in Memory-Augmented Adam using Critical Momenta", TMLR 2024, '
    "[OpenReview sHSkJqyQgW](https://openreview.net/forum?id=sHSkJqyQgW), "
    "[arXiv:2307.09638](https://arxiv.org/abs/2307.09638)"
)
CM_BIBTEX = r"""@article{malviya2024promoting,
  title   = {Promoting Exploration in Memory-Augmented Adam using Critical Momenta},
  author  = {Malviya, Pranshu and Mordido, Gon{\c{c}}alo and Baratin, Aristide and Babanezhad Harikandeh, Reza
             and Huang, Jerry and Lacoste-Julien, Simon and Pascanu, Razvan and Chandar, Sarath},
  journal = {Transactions on Machine Learning Research (TMLR)},
  year    = {2024},
  url     = {https://openreview.net/forum?id=sHSkJqyQgW},
  note    = {arXiv:2307.09638}
}"""


def unwrap_optimizer(optimizer: Any) -> Any:
    """The hf_memopt optimizer inside accelerate/DeepSpeed wrappers, or None."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "memory_stats") and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if optimizer is not None and hasattr(optimizer, "memory_stats") else None


def spec_of(args: Any, optimizer: Any = None) -> OptimizerSpec | None:
    """Which memopt optimizer ran: from the optimizer object if any, else from ``args.optim``."""
    inner = unwrap_optimizer(optimizer)
    if inner is not None:
        for spec in SPECS.values():
            if type(inner).__name__ == spec.class_name:
                return spec
    return SPECS.get(optim_name(getattr(args, "optim", None)))


def _group_values(optimizer: Any, key: str) -> list[Any]:
    values: list[Any] = []
    for group in optimizer.param_groups:
        if group["params"] and key in group:
            # param groups keep buffer_dtype by name ("bfloat16"); show it like optim_args does
            value = parse_buffer_dtype(group[key]) if key == "buffer_dtype" else group[key]
            if value not in values:
                values.append(value)
    return values


def _fmt(values: Iterable[Any]) -> str:
    return " / ".join(format_value(v) for v in values)


def _resolved_or_none(spec: OptimizerSpec, args: Any) -> dict[str, Any] | None:
    """``args.optim_args`` resolved for ``spec``, or None when they belong to another optimizer."""
    if optim_name(getattr(args, "optim", None)) != spec.name:
        return None
    try:
        return resolve_optim_args(spec.name, getattr(args, "optim_args", None)).values()
    except ValueError:
        return None


def executors(optimizer: Any) -> list[str]:
    """One line per non-empty param group naming the executor that ran it, if the optimizer says.

    Read defensively: ``optimizer.executor_for(group)`` exists only on optimizers that choose an executor
    per group, and returns None before the group's first step.
    """
    executor_for = getattr(optimizer, "executor_for", None)
    if not callable(executor_for):
        return []
    lines = []
    for index, group in enumerate(optimizer.param_groups):
        if not group["params"]:
            continue
        try:
            executor = executor_for(group)
        except Exception as err:  # a card is a report: say what happened rather than fail the run
            executor = f"unknown ({type(err).__name__}: {err})"
        elements = sum(p.numel() for p in group["params"])
        lines.append(
            f"- param group {index} ({len(group['params'])} tensors, {elements:,} elements): "
            f"{executor if executor is not None else 'not run yet (no step taken)'}"
        )
    return lines


def hyperparameters(args: Any, optimizer: Any = None) -> dict[str, str]:
    """Every hyperparameter of the memopt optimizer used with ``args``, as display strings.

    Read from the built optimizer's param groups when given (values that differ between
    groups are joined with ``/``), else resolved from ``args.optim_args``.
    """
    spec = spec_of(args, optimizer)
    if spec is None:
        raise ValueError(f"optim={optim_name(getattr(args, 'optim', None))!r} is not a memopt optimizer")
    inner = unwrap_optimizer(optimizer)
    rows: dict[str, str] = {
        "optim": spec.name,
        "class": f"hf_memopt.{spec.class_name} (base: {spec.torch_counterpart})",
    }
    schedule = getattr(getattr(args, "lr_scheduler_type", None), "value", getattr(args, "lr_scheduler_type", None))
    rows["learning_rate"] = f"{args.learning_rate} (peak; {schedule} schedule)"
    if spec.adam_style:
        rows["betas"] = f"({args.adam_beta1}, {args.adam_beta2})"
        rows["eps"] = format_value(args.adam_epsilon)
    rows["weight_decay"] = f"{args.weight_decay} (0.0 for biases and normalization weights)"
    if inner is not None:
        resolved = _resolved_or_none(spec, args)
        for key in spec.options:
            values = _group_values(inner, key)
            if not values and hasattr(inner, key):  # an optimizer-wide setting such as save_memory
                values = [getattr(inner, key)]
            if not values and resolved is not None:
                values = [resolved[key]]
            rows[key] = _fmt(values)
            if resolved is not None and key in resolved and values and values != [resolved[key]]:
                # what ran is what the optimizer holds (e.g. a resumed checkpoint's value, loaded as torch loads
                # every hyperparameter): say so next to the Trainer's own record of optim_args
                rows[key] += (
                    f" (ran; `optim_args` said {format_value(resolved[key])}: a resumed checkpoint's value wins)"
                )
    else:
        for key, value in resolve_optim_args(spec.name, args.optim_args).values().items():
            rows[key] = format_value(value)
    clip = getattr(args, "max_grad_norm", None)
    stored = "momenta built from gradients" if spec.critical_momenta else "gradients"
    rows["max_grad_norm"] = (
        f"{clip} (the memory stores {stored} after clipping to this global norm)"
        if clip
        else f"{clip} (no clipping: the memory stores {stored.replace('gradients', 'raw gradients')})"
    )
    return rows


def human_bytes(n: int) -> str:
    """``n`` bytes as B, KiB, MiB, GiB or TiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def state_bytes(optimizer: Any) -> tuple[int, int, int]:
    """(all optimizer-state bytes, of which memory bytes, trainable elements) on this process.

    Computed from ``optimizer.state`` directly (not ``memory_stats()``: a card needs no admission counts,
    and reading them would move the transfer of a device's counters here), with the engine's one definition of state bytes
    (:func:`hf_memopt.engine.state.tensor_bytes`: each storage once, 0-dim scalars left out).
    """
    from ..engine.state import is_memory_key, tensor_bytes

    total = memory = 0
    for state in optimizer.state.values():
        total += tensor_bytes(state.values())
        memory += tensor_bytes(v for k, v in state.items() if is_memory_key(k))
    elements = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return total, memory, elements


def optimizer_section(args: Any, optimizer: Any = None) -> str:
    """The markdown section (with its delimiting comments) for a card."""
    spec = spec_of(args, optimizer)
    if spec is None:
        raise ValueError("optimizer_section needs a memopt optimizer")
    rows = hyperparameters(args, optimizer)
    if spec.critical_momenta:
        method = (
            f"Trained with `hf_memopt.{spec.class_name}` (Critical Momenta): `{spec.torch_counterpart}` whose "
            "momentum is aggregated with a memory of critical momenta. Each parameter tensor keeps the `topc` past "
            "momenta whose step had the largest gradient norm; their priorities decay by `decay` each step, and the "
            "second moment and the update use the current momentum plus `kappa` times the mean of the stored ones. "
            "Method: " + CM_PAPER + ", built on the critical-gradient memory of " + PAPER + "."
        )
        citations = [CM_BIBTEX, BIBTEX]
    else:
        method = (
            f"Trained with `hf_memopt.{spec.class_name}`: `{spec.torch_counterpart}` whose gradient is aggregated "
            "with a memory of critical gradients. Each parameter tensor keeps the `topc` past gradients with the "
            "largest norm; their priorities decay by `decay` each step, and the update uses the current gradient "
            "combined with the stored ones (weight `kappa`). Method: " + PAPER + "."
        )
        citations = [BIBTEX]
    lines = [
        START,
        f"### Optimizer: {spec.name}",
        "",
        method,
        "",
        "| hyperparameter | value |",
        "|:--|:--|",
        *(f"| {key} | {value} |" for key, value in rows.items()),
        "",
    ]
    inner = unwrap_optimizer(optimizer)
    if inner is not None and inner.state:
        total, memory, elements = state_bytes(inner)
        lines.append(
            f"Optimizer state after training: {human_bytes(total)} ({total:,} bytes) on this process for "
            f"{elements:,} trainable parameter elements: the gradient memory takes {human_bytes(memory)} "
            f"({memory:,} bytes), the {spec.torch_counterpart} state {human_bytes(total - memory)} "
            f"({total - memory:,} bytes)."
        )
    else:
        lines.append("Optimizer state: not measured (the optimizer had not taken a step when this card was written).")
    executor_lines = executors(inner) if inner is not None else []
    if executor_lines:
        lines += ["", "Executor that ran each param group:", "", *executor_lines]
    lines += ["", "#### Citation", "", "```bibtex", "\n\n".join(citations), "```", END]
    return "\n".join(lines) + "\n"


def insert_section(card: str, section: str) -> str:
    """``card`` with ``section`` in place of an earlier one, else before "Framework versions"."""
    if START in card and END in card:
        head, rest = card.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    anchor = "### Framework versions"
    if anchor in card:
        head, tail = card.split(anchor, 1)
        return head + section + "\n" + anchor + tail
    return card.rstrip("\n") + "\n\n" + section
