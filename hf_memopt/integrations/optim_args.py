"""Strict parsing of ``TrainingArguments.optim_args`` for the ``memopt_*`` optimizers.

transformers' own parser (``key=value`` pairs split on commas) passes unknown keys through
silently and converts values ad hoc per optimizer, so a typo such as ``tpoc=5`` trains
with the default memory size without a word. Here every key must be known for the chosen
optimizer and every value must parse; the error names the key and what is allowed.

The resolved values (every key, defaults included) are formatted back into the same
``key=value,...`` syntax, which transformers' parser also reads, so the string written
into ``args.optim_args`` documents exactly what ran and parses to the same values again.

No transformers import here: this module is plain Python on top of
:mod:`hf_memopt.config`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import AGGREGATIONS, KEYS, MEMORY_ARG_NAMES, MemoryConfig, dtype_name, parse_buffer_dtype

#: Keys the Trainer takes from ``TrainingArguments`` fields, never from ``optim_args``
#: (as for ``adamw_torch``): a value here would be ignored or fight the field.
TRAINING_ARGS_KEYS: dict[str, str] = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
}
#: The same for the Adam-style optimizers.
ADAM_TRAINING_ARGS_KEYS: dict[str, str] = {
    "betas": "adam_beta1 and adam_beta2",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "eps": "adam_epsilon",
    "epsilon": "adam_epsilon",
    "adam_epsilon": "adam_epsilon",
}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")


def _parse_bool(key: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"optim_args: {key} must be true or false; got {text!r}")


def _parse_optional_bool(key: str, text: str) -> bool | None:
    if text.lower() in _NONE:
        return None
    try:
        return _parse_bool(key, text)
    except ValueError:
        raise ValueError(f"optim_args: {key} must be true, false or none; got {text!r}") from None


def _parse_float(key: str, text: str, minimum: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"optim_args: {key} must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"optim_args: {key} must be a finite number; got {text!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"optim_args: {key} must be >= {minimum:g}; got {text!r}")
    return value


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"optim_args: {key} must be an integer; got {text!r}") from None


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(key: str, text: str) -> str:
        if text not in choices:
            raise ValueError(f"optim_args: {key} must be one of {', '.join(choices)}; got {text!r}")
        return text

    return parse


def _parse_dtype(key: str, text: str) -> torch.dtype | None:
    try:
        return parse_buffer_dtype(text)
    except ValueError as err:
        raise ValueError(f"optim_args: {err}") from None


@dataclass(frozen=True)
class Option:
    """One ``optim_args`` key: its parser and its default."""

    parse: Callable[[str, str], Any]
    default: Any
    doc: str


def _non_negative(key: str, text: str) -> float:
    return _parse_float(key, text, minimum=0.0)


_MEMORY_OPTIONS: dict[str, Option] = {
    "topc": Option(_parse_int, 10, "int >= 1: past gradients kept per parameter tensor"),
    "decay": Option(_parse_float, 0.7, "0 < decay <= 1: priority decay per step"),
    "kappa": Option(_parse_float, 1.0, "number >= 0: weight of the memory (0 = base optimizer)"),
    "aggregation": Option(_parse_choice(AGGREGATIONS), "mean", " | ".join(AGGREGATIONS)),
    "key": Option(_parse_choice(KEYS), "group", " | ".join(KEYS)),
    "buffer_dtype": Option(_parse_dtype, None, "none | bf16 | fp16 | fp32: dtype of stored gradients"),
}
_AMSGRAD = Option(_parse_bool, False, "true | false")
_MAXIMIZE = Option(_parse_bool, False, "true | false")
_FOREACH = Option(_parse_optional_bool, None, "true | false | none (torch picks)")
_FUSED = Option(_parse_optional_bool, None, "true | false | none (torch picks)")
_MOMENTUM = Option(_non_negative, 0.0, "number >= 0")
#: Not a hyperparameter of the update: whether ``state_dict()`` (so ``optimizer.pt`` in Trainer checkpoints)
#: carries the gradient memory. ``false``: checkpoints of about the size of the torch optimizer's; resuming
#: from one warns and starts with empty memory.
_SAVE_MEMORY = Option(_parse_bool, True, "true | false: keep the gradient memory in checkpoints")
#: Not a hyperparameter either: which implementation runs the step (SPEC section 2; not saved in checkpoints).
_EXECUTOR = Option(
    _parse_choice(("auto", "torch", "cpu", "triton")),
    "auto",
    "auto | torch | cpu | triton: which implementation runs the step (auto: triton on CUDA, cpu on fp32 CPU Adam)",
)


@dataclass(frozen=True)
class OptimizerSpec:
    """What the Trainer integration needs to know about one ``memopt_*`` optimizer."""

    name: str
    """The ``optim`` value, e.g. ``"memopt_adamw"``."""
    class_name: str
    """Attribute of :mod:`hf_memopt` holding the optimizer class."""
    torch_counterpart: str
    adam_style: bool
    """True: ``betas``/``eps`` come from ``adam_beta1``/``adam_beta2``/``adam_epsilon``."""
    default_aggregation: str | None
    """None: the optimizer has no ``aggregation`` argument (Critical Momenta), and the key is refused."""
    base_options: dict[str, Option] = field(default_factory=dict)
    default_topc: int = 10
    critical_momenta: bool = False
    """The memory holds momenta (SPEC 1b), not gradients: model cards describe and cite it so."""

    @property
    def member_name(self) -> str:
        """Name of the ``OptimizerNames`` member, e.g. ``MEMOPT_ADAMW``."""
        return self.name.upper()

    @property
    def options(self) -> dict[str, Option]:
        """Every key ``optim_args`` accepts for this optimizer, memory keys first, ``save_memory`` and ``executor`` last."""
        memory = dict(_MEMORY_OPTIONS)
        memory["topc"] = Option(memory["topc"].parse, self.default_topc, memory["topc"].doc)
        if self.default_aggregation is None:
            del memory["aggregation"]
        else:
            memory["aggregation"] = Option(
                memory["aggregation"].parse, self.default_aggregation, memory["aggregation"].doc
            )
        return {**memory, **self.base_options, "save_memory": _SAVE_MEMORY, "executor": _EXECUTOR}

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The optimizer class (imported on first use: ``hf_memopt`` imports this module)."""
        import hf_memopt

        return getattr(hf_memopt, self.class_name)


SPECS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            "memopt_adamw",
            "MemoryAugmentedAdamW",
            "torch.optim.AdamW",
            adam_style=True,
            default_aggregation="mean",
            base_options={"amsgrad": _AMSGRAD, "maximize": _MAXIMIZE, "foreach": _FOREACH, "fused": _FUSED},
        ),
        OptimizerSpec(
            "memopt_adam",
            "MemoryAugmentedAdam",
            "torch.optim.Adam",
            adam_style=True,
            default_aggregation="mean",
            base_options={"amsgrad": _AMSGRAD, "maximize": _MAXIMIZE, "foreach": _FOREACH, "fused": _FUSED},
        ),
        OptimizerSpec(
            "memopt_sgd",
            "MemoryAugmentedSGD",
            "torch.optim.SGD",
            adam_style=False,
            default_aggregation="sum",
            base_options={
                "momentum": _MOMENTUM,
                "dampening": Option(_parse_float, 0.0, "number"),
                "nesterov": Option(_parse_bool, False, "true | false"),
                "maximize": _MAXIMIZE,
                "foreach": _FOREACH,
                "fused": _FUSED,
            },
        ),
        OptimizerSpec(
            "memopt_rmsprop",
            "MemoryAugmentedRMSprop",
            "torch.optim.RMSprop",
            adam_style=False,
            default_aggregation="mean",
            base_options={
                "alpha": Option(_non_negative, 0.99, "number >= 0: smoothing constant"),
                # transformers' own "rmsprop" also takes eps from optim_args (adam_epsilon is Adam's).
                "eps": Option(_non_negative, 1e-8, "number >= 0"),
                "centered": Option(_parse_bool, False, "true | false"),
                "momentum": _MOMENTUM,
                "maximize": _MAXIMIZE,
                "foreach": _FOREACH,
            },
        ),
        OptimizerSpec(
            "memopt_adamw_cm",
            "CriticalMomentaAdamW",
            "torch.optim.AdamW",
            adam_style=True,
            default_aggregation=None,
            base_options={"amsgrad": _AMSGRAD, "maximize": _MAXIMIZE, "foreach": _FOREACH, "fused": _FUSED},
            default_topc=5,
            critical_momenta=True,
        ),
    )
}

MEMOPT_NAMES: tuple[str, ...] = tuple(SPECS)


def optim_name(optim: Any) -> str:
    """The plain string of an ``optim`` value (an ``OptimizerNames`` member or a str)."""
    return str(getattr(optim, "value", optim))


def is_memopt(optim: Any) -> bool:
    """True if ``optim`` (member or string) names one of our optimizers."""
    return optim_name(optim) in SPECS


@dataclass(frozen=True)
class ResolvedOptimArgs:
    """The complete, validated ``optim_args`` of one ``memopt_*`` optimizer."""

    spec: OptimizerSpec
    memory: MemoryConfig
    base: dict[str, Any]
    save_memory: bool = True
    executor: str = "auto"

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the optimizer class (besides lr/betas/eps/weight_decay)."""
        # the typed values (buffer_dtype as a torch.dtype), not the param-group form
        memory = {name: getattr(self.memory, name) for name in MEMORY_ARG_NAMES if name in self.spec.options}
        return {**memory, **self.base, "save_memory": self.save_memory, "executor": self.executor}

    def values(self) -> dict[str, Any]:
        """Every key with its resolved value, in the documented order."""
        resolved = self.constructor_kwargs()
        return {key: resolved[key] for key in self.spec.options}

    def to_optim_args(self) -> str:
        """``key=value,...`` with every key; parses back to the same values."""
        return ",".join(f"{key}={format_value(value)}" for key, value in self.values().items())


def format_value(value: Any) -> str:
    """A value as written in ``optim_args`` (and shown in model cards)."""
    if value is None:
        return "None"
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def split_optim_args(text: str | None) -> dict[str, str]:
    """Split ``"k1=v1,k2=v2"`` into a dict; malformed entries and repeated keys are errors."""
    pairs: dict[str, str] = {}
    if text is None:
        return pairs
    if not isinstance(text, str):
        raise ValueError(f"optim_args must be a string like 'topc=5,decay=0.9'; got {type(text).__name__}")
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue  # tolerate "a=1," and the empty string
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value or "=" in value:
            raise ValueError(f"optim_args entry {entry!r} is not of the form key=value")
        if key in pairs:
            raise ValueError(f"optim_args: {key} is given twice")
        pairs[key] = value
    return pairs


def _unknown_key_message(key: str, spec: OptimizerSpec) -> str:
    fields_by_key = {**TRAINING_ARGS_KEYS, **(ADAM_TRAINING_ARGS_KEYS if spec.adam_style else {})}
    if key in fields_by_key:
        target = fields_by_key[key]
        return (
            f"optim_args: {key} is not accepted for {spec.name}; set TrainingArguments.{target} instead "
            "(the Trainer passes it as it does for adamw_torch)"
        )
    allowed = ", ".join(f"{k} ({opt.doc})" for k, opt in spec.options.items())
    if key == "aggregation" and spec.default_aggregation is None:
        return (
            f"optim_args: aggregation is not accepted for {spec.name}: Critical Momenta's aggregation is fixed "
            f"(m + kappa*S/n, the stored momenta's mean added to the momentum). Allowed keys: {allowed}"
        )
    close = difflib.get_close_matches(key, list(spec.options), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"optim_args: unknown key {key!r} for {spec.name}.{hint} Allowed keys: {allowed}"


def resolve_optim_args(optim: Any, optim_args: str | Mapping[str, str] | None) -> ResolvedOptimArgs:
    """Validate ``optim_args`` for the ``memopt_*`` optimizer ``optim``; fill in defaults.

    Raises ``ValueError`` naming the offending key and what is allowed.
    """
    name = optim_name(optim)
    if name not in SPECS:
        raise ValueError(f"{name!r} is not a memopt optimizer; expected one of {', '.join(MEMOPT_NAMES)}")
    spec = SPECS[name]
    given = dict(optim_args) if isinstance(optim_args, Mapping) else split_optim_args(optim_args)
    options = spec.options
    values = {key: opt.default for key, opt in options.items()}
    for key, text in given.items():
        if key not in options:
            raise ValueError(_unknown_key_message(key, spec))
        values[key] = options[key].parse(key, str(text))
    try:
        memory = MemoryConfig(**{key: values[key] for key in _MEMORY_OPTIONS if key in options})
    except ValueError as err:
        raise ValueError(f"optim_args: {err}") from None
    base = {key: values[key] for key in spec.base_options}
    return ResolvedOptimArgs(spec, memory, base, save_memory=values["save_memory"], executor=values["executor"])
