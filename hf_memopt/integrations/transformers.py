"""Make ``optim="memopt_adamw"`` (and ``memopt_adam``, ``memopt_sgd``, ``memopt_rmsprop``,
``memopt_adamw_cm``) work with the plain 🤗 ``Trainer``, ``TrainingArguments``, ``HfArgumentParser`` and TRL.

transformers 5.x has no public registry for optimizers, so :func:`register` touches four
places, all checked first (:func:`check_transformers_internals`):

1. ``transformers.training_args.OptimizerNames`` gets five members (one per ``optim`` name). ``TrainingArguments``
   validates ``optim`` with ``OptimizerNames(value)`` and ``HfArgumentParser`` offers the
   members as ``--optim`` choices, so this is what makes the names accepted everywhere.
   Each member pickles as "import hf_memopt, then look the name up", so a checkpoint's
   ``training_args.bin`` loads in a process that never imported hf_memopt.
2. ``Trainer.get_optimizer_cls_and_kwargs`` (public static method, called by
   ``Trainer.create_optimizer``) is wrapped: our names are answered here, any other name
   goes to the original. ``Trainer.create_scheduler`` (which runs right after
   ``accelerator.prepare``) is wrapped too: under DeepSpeed it binds the ZeRO partitions to a
   memopt client optimizer (``hf_memopt.distributed.deepspeed.bind_prepared``), and raises if a
   memopt optimizer was built but another one will step. ``Trainer.create_optimizer`` is
   wrapped so that ZeRO-Offload keeps the memopt optimizer (``deepspeed_guard.keep_client_optimizer``).
3. Since transformers 5.2 the original looks names up in the private table
   ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``; our names are added there too,
   so code that calls the table (or the unwrapped original) also finds them.
4. ``TrainingArguments.__post_init__`` and ``TrainingArguments.set_optimizer`` are wrapped
   to validate ``optim_args`` strictly and refuse a DeepSpeed config with its own
   optimizer as soon as the arguments exist, i.e. before any model is loaded, and to
   write the resolved ``optim_args`` back (shown in ``to_dict()``, logs and model cards).

Items 1 and 4 (and the ``--optim_args`` help listing the memopt keys) need only
``transformers.training_args`` (:func:`register_training_args`); items 2 and 3 need
``transformers.trainer`` (:func:`register_trainer`). ``import hf_memopt`` imports neither:
it installs an import hook (:mod:`hf_memopt.integrations`) that runs each part right after
transformers loads the module it touches, so a pure-PyTorch user never pays for
transformers. :func:`register` does both at once.

Everything is idempotent: calling :func:`register` again, or re-importing this module,
changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .deepspeed_guard import check_deepspeed_optimizer
from .enum_ext import EnumExtensionError, check_extensible, extend_enum
from .optim_args import MEMOPT_NAMES, SPECS, ResolvedOptimArgs, is_memopt, optim_name, resolve_optim_args

#: transformers versions this integration is written and tested for (oldest and newest
#: of the range are exercised by ``tests/compat/run_matrix.sh``).
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
_MIN_VERSION = (5, 0)
_MAX_VERSION_EXCLUSIVE = (6, 0)

#: Tags added to the model (``model.add_model_tags``) so they reach the cards written by
#: ``Trainer.push_to_hub``, ``PreTrainedModel.push_to_hub``, PEFT and TRL.
LIBRARY_TAG = "hf_memopt"

_MARK = "_hf_memopt_wrapper"
_HELP_MARK = "For optim=memopt_* (hf_memopt)"
_lock = threading.RLock()
_training_args_done = False
_trainer_done = False


class TransformersCompatibilityError(RuntimeError):
    """The installed transformers lacks an internal this integration relies on."""


def _transformers_version() -> str:
    import transformers

    return getattr(transformers, "__version__", "unknown")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _incompatible(what: str) -> TransformersCompatibilityError:
    return TransformersCompatibilityError(
        f"hf_memopt cannot register its optimizers with transformers {_transformers_version()}: {what}. "
        f"hf_memopt supports transformers {SUPPORTED_TRANSFORMERS}; install a version in that range "
        "(or set HF_MEMOPT_SKIP_TRANSFORMERS=1 to use the optimizers without the Trainer integration)."
    )


# --------------------------------------------------------------------------------------
# Dispatch: what the Trainer builds for a memopt name
# --------------------------------------------------------------------------------------


def _optimizer_kwargs(args: Any, resolved: ResolvedOptimArgs) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if resolved.spec.adam_style:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = args.adam_epsilon
    # The Trainer's two param groups carry their own weight_decay (args.weight_decay and
    # 0.0), which wins; the kwarg only matters for callers that pass plain parameters.
    kwargs["weight_decay"] = args.weight_decay
    kwargs.update(resolved.constructor_kwargs())
    return kwargs


def validate_training_args(args: Any) -> ResolvedOptimArgs:
    """Check ``args.optim_args`` (and any DeepSpeed config) for a ``memopt_*`` ``args.optim``.

    Builds the optimizer once on a one-element dummy tensor so constraints the optimizer
    itself enforces (e.g. ``nesterov`` needs ``momentum > 0``) also fail here, early.
    Writes the resolved ``optim_args`` back to ``args``. Raises ``ValueError``.
    """
    name = optim_name(args.optim)
    check_deepspeed_optimizer(args, name)
    resolved = resolve_optim_args(name, args.optim_args)
    optimizer_cls = resolved.spec.optimizer_class()
    try:
        optimizer_cls([torch.zeros(1, requires_grad=True)], **_optimizer_kwargs(args, resolved))
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"optim={name!r} with optim_args={args.optim_args!r}: {err}") from err
    args.optim_args = resolved.to_optim_args()
    return resolved


def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``Trainer.get_optimizer_cls_and_kwargs`` for the ``memopt_*`` names.

    ``lr``, ``betas`` and ``eps`` come from ``TrainingArguments`` as for ``adamw_torch``;
    everything else from the (strictly parsed) ``optim_args``. Also tags ``model`` with
    ``hf_memopt`` and the optimizer name.
    """
    resolved = validate_training_args(args)
    if model is not None and hasattr(model, "add_model_tags"):
        model.add_model_tags([LIBRARY_TAG, resolved.spec.name])
    return resolved.spec.optimizer_class(), _optimizer_kwargs(args, resolved)


def _table_handler(ctx: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Entry of ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (5.2+)."""
    return get_optimizer_cls_and_kwargs(ctx.args, ctx.model)


# --------------------------------------------------------------------------------------
# Pickling of the enum members
# --------------------------------------------------------------------------------------


def load_optimizer_name(value: str) -> Any:
    """Unpickle a ``memopt_*`` ``OptimizerNames`` member: register first, then look up.

    Pickles name this function, so unpickling imports ``hf_memopt`` (which registers).
    """
    register_training_args()
    from transformers.training_args import OptimizerNames

    return OptimizerNames(value)


def _reduce_optimizer_name(value: str, protocol: int) -> tuple[Callable[[str], Any], tuple[str]]:
    return load_optimizer_name, (value,)


# --------------------------------------------------------------------------------------
# Checks of the transformers internals we rely on
# --------------------------------------------------------------------------------------


def check_transformers_internals() -> None:
    """Raise :class:`TransformersCompatibilityError` if an internal we use has changed.

    Also run as a test on the oldest and the newest supported transformers.
    """
    try:
        from transformers import Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames
    except ImportError as err:
        raise _incompatible(f"importing Trainer/TrainingArguments/OptimizerNames failed ({err})") from err
    _check_training_args_internals(OptimizerNames, TrainingArguments)
    _check_trainer_internals(Trainer)


def _check_training_args_internals(optimizer_names: Any, training_arguments: Any) -> None:
    """The checks that need only ``transformers.training_args``."""
    try:
        check_extensible(optimizer_names)
    except EnumExtensionError as err:
        raise _incompatible(f"OptimizerNames can no longer be extended ({err})") from err
    if not issubclass(optimizer_names, str):
        raise _incompatible("OptimizerNames is no longer a str enum")

    if "optim" not in {f.name for f in dataclasses.fields(training_arguments)}:
        raise _incompatible("TrainingArguments has no 'optim' field")
    for method in ("__post_init__", "set_optimizer"):
        if not callable(getattr(training_arguments, method, None)):
            raise _incompatible(f"TrainingArguments.{method} is missing")


def _check_trainer_internals(trainer_cls: Any) -> None:
    """The checks of ``transformers.trainer`` (and ``trainer_optimizer``, 5.2+)."""
    static = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs", None)
    if not isinstance(static, staticmethod):
        raise _incompatible("Trainer.get_optimizer_cls_and_kwargs is no longer a static method")
    create_optimizer = trainer_cls.create_optimizer
    create_source = None
    # Only transformers' own method is checked: a library that patched it (its source need
    # not mention the name) is not a transformers change. No source shipped: cannot check.
    if getattr(create_optimizer, "__module__", None) == trainer_cls.__module__:
        try:
            create_source = inspect.getsource(create_optimizer)
        except (OSError, TypeError):
            create_source = None
    if create_source is not None and "get_optimizer_cls_and_kwargs" not in create_source:
        raise _incompatible("Trainer.create_optimizer no longer calls get_optimizer_cls_and_kwargs")
    if not callable(getattr(trainer_cls, "create_scheduler", None)):
        raise _incompatible("Trainer.create_scheduler is missing")

    table_module = _trainer_optimizer_module()
    if table_module is not None:
        table = getattr(table_module, "_OPTIMIZER_HANDLERS", None)
        if table is not None and not isinstance(table, dict):
            raise _incompatible("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is not a dict")
        context = getattr(table_module, "OptimizerContext", None)
        if table is not None and (
            context is None
            or not dataclasses.is_dataclass(context)
            or not {"args", "model"} <= {f.name for f in dataclasses.fields(context)}
        ):
            raise _incompatible("transformers.trainer_optimizer.OptimizerContext lacks 'args'/'model'")


def _trainer_optimizer_module() -> Any:
    """``transformers.trainer_optimizer`` (5.2+), or None on older versions."""
    try:
        from transformers import trainer_optimizer
    except ImportError:
        return None
    return trainer_optimizer


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _wrap_get_optimizer_cls_and_kwargs(trainer_cls: type) -> None:
    original = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs").__func__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs_with_memopt(args: Any, model: Any = None) -> tuple[Any, Any]:
        if is_memopt(args.optim):
            return get_optimizer_cls_and_kwargs(args, model)
        return original(args, model)

    setattr(get_optimizer_cls_and_kwargs_with_memopt, _MARK, True)
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs_with_memopt)


def _wrap_create_scheduler(trainer_cls: type) -> None:
    """Bind DeepSpeed's partitions to a memopt client optimizer right after ``accelerator.prepare``.

    ``Trainer`` creates the scheduler just after preparing the model and optimizer, and before it
    loads a checkpoint: the point where ``hf_memopt.distributed.deepspeed.bind`` must run.
    """
    original = trainer_cls.create_scheduler
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_scheduler_then_bind(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False):
            from ..distributed.deepspeed import bind_prepared

            # A memopt optimizer was built or asked for: the one that steps after prepare must be it (a
            # ZeRO-Offload swap, a create_optimizer override that builds another one).
            optim = getattr(self.args, "optim", None)
            expected = getattr(self, _EXPECTED_ATTR, None) or (optim_name(optim) if is_memopt(optim) else None)
            bind_prepared(self.optimizer, expected=expected)
        return result

    setattr(create_scheduler_then_bind, _MARK, True)
    trainer_cls.create_scheduler = create_scheduler_then_bind


_EXPECTED_ATTR = "_hf_memopt_expected_optimizer"


def _deepspeed_configs(trainer: Any) -> list[Any]:
    """The DeepSpeed config dicts accelerate will hand to ``deepspeed.initialize`` (usually one object)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    configs: list[Any] = []
    for config in (
        getattr(plugin, "deepspeed_config", None),
        getattr(getattr(plugin, "hf_ds_config", None), "config", None),
    ):
        if isinstance(config, dict) and all(config is not c for c in configs):
            configs.append(config)
    return configs


def _wrap_create_optimizer(trainer_cls: type) -> None:
    """Under DeepSpeed, keep a memopt optimizer through ``accelerator.prepare`` (ZeRO-Offload).

    ``Trainer.create_optimizer`` runs right before ``prepare``; with ZeRO-Offload and no
    ``"zero_force_ds_cpu_optimizer"`` key, accelerate would then swap the memopt optimizer for
    DeepSpeedCPUAdam without a word. Sets the key to false (logged; ``deepspeed_guard.keep_client_optimizer``)
    and records what was built, which ``create_scheduler`` checks after ``prepare``.
    """
    original = trainer_cls.create_optimizer
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_optimizer_keeping_memopt(self: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer = original(self, *args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) and hasattr(optimizer, "memory_stats"):
            from .deepspeed_guard import keep_client_optimizer

            optim = getattr(self.args, "optim", None)
            name = optim_name(optim) if is_memopt(optim) else type(optimizer).__name__
            setattr(self, _EXPECTED_ATTR, name)
            for config in _deepspeed_configs(self):
                keep_client_optimizer(config, name)
        return optimizer

    setattr(create_optimizer_keeping_memopt, _MARK, True)
    trainer_cls.create_optimizer = create_optimizer_keeping_memopt


def _wrap_training_args(args_cls: type) -> None:
    post_init = inspect.getattr_static(args_cls, "__post_init__")
    if not getattr(post_init, _MARK, False):

        @functools.wraps(post_init)
        def __post_init__(self: Any) -> None:
            # Before transformers' own checks, which import DeepSpeed for a DeepSpeed config:
            # a config that would replace our optimizer fails even where DeepSpeed is absent.
            if is_memopt(self.optim):
                validate_training_args(self)
            post_init(self)

        setattr(__post_init__, _MARK, True)
        args_cls.__post_init__ = __post_init__

    set_optimizer = inspect.getattr_static(args_cls, "set_optimizer")
    if not getattr(set_optimizer, _MARK, False):

        @functools.wraps(set_optimizer)
        def set_optimizer_with_memopt(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = set_optimizer(self, *args, **kwargs)
            if is_memopt(self.optim):
                validate_training_args(self)
            return result

        setattr(set_optimizer_with_memopt, _MARK, True)
        args_cls.set_optimizer = set_optimizer_with_memopt


def _check_version() -> None:
    version = _transformers_version()
    if not (_MIN_VERSION <= _version_tuple(version) < _MAX_VERSION_EXCLUSIVE):
        warnings.warn(
            f"hf_memopt is tested with transformers {SUPPORTED_TRANSFORMERS}; found {version}. "
            "The internals it relies on passed their checks, so it registers anyway.",
            RuntimeWarning,
            stacklevel=3,
        )


def _optim_args_help(original: str) -> str:
    """``--optim_args`` help: transformers' text plus the keys of every ``memopt_*`` optimizer."""
    lines = [original.rstrip(), "For optim=memopt_* (hf_memopt), comma-separated key=value pairs, checked strictly:"]
    common = None
    for name in MEMOPT_NAMES:
        keys = list(SPECS[name].options)
        common = keys if common is None else [k for k in common if k in keys]
    assert common is not None
    lines.append("all of them: " + ", ".join(common) + ";")
    for name in MEMOPT_NAMES:
        extra = [k for k in SPECS[name].options if k not in common]
        if extra:
            lines.append(f"{name} also: " + ", ".join(extra) + ";")
    lines.append(
        'e.g. "topc=5,decay=0.9,buffer_dtype=bf16". The learning rate, weight decay and Adam\'s betas and epsilon '
        "come from their own flags."
    )
    return " ".join(lines)


def _extend_optim_args_help(training_arguments: Any) -> None:
    """Make ``HfArgumentParser``'s ``--optim_args`` help list the memopt keys (idempotent)."""
    for f in dataclasses.fields(training_arguments):
        if f.name == "optim_args":
            help_text = str(f.metadata.get("help", ""))
            if _HELP_MARK not in help_text:
                f.metadata = types.MappingProxyType({**f.metadata, "help": _optim_args_help(help_text)})
            return


def register_training_args(training_args_module: Any = None) -> None:
    """Register the names with ``transformers.training_args`` (the enum and ``TrainingArguments``).

    This part is all that ``TrainingArguments(optim="memopt_adamw")`` and ``HfArgumentParser``
    need; it imports nothing beyond ``transformers.training_args``. Idempotent; raises
    :class:`TransformersCompatibilityError` (naming the installed version) if an internal changed.
    """
    global _training_args_done
    with _lock:
        if _training_args_done:
            return
        if training_args_module is None:
            from transformers import training_args as training_args_module
        optimizer_names = getattr(training_args_module, "OptimizerNames", None)
        training_arguments = getattr(training_args_module, "TrainingArguments", None)
        if optimizer_names is None or training_arguments is None:
            raise _incompatible("transformers.training_args has no OptimizerNames/TrainingArguments")
        _check_training_args_internals(optimizer_names, training_arguments)
        _check_version()
        for name in MEMOPT_NAMES:
            spec = SPECS[name]
            reduce_ex = functools.partial(_reduce_optimizer_name, name)
            try:
                extend_enum(optimizer_names, spec.member_name, name, reduce_ex)
            except EnumExtensionError as err:
                raise _incompatible(str(err)) from err
        _wrap_training_args(training_arguments)
        _extend_optim_args_help(training_arguments)
        _training_args_done = True


def register_trainer(trainer_module: Any = None) -> None:
    """Register the dispatch with ``transformers.trainer`` (and ``trainer_optimizer``, 5.2+).

    Registers the ``training_args`` part first if that has not happened. Idempotent; raises
    :class:`TransformersCompatibilityError` if an internal changed.
    """
    global _trainer_done
    with _lock:
        if _trainer_done:
            return
        register_training_args()
        if trainer_module is None:
            from transformers import trainer as trainer_module
        trainer_cls = getattr(trainer_module, "Trainer", None)
        if trainer_cls is None:
            raise _incompatible("transformers.trainer has no Trainer")
        _check_trainer_internals(trainer_cls)
        from transformers.training_args import OptimizerNames

        _wrap_get_optimizer_cls_and_kwargs(trainer_cls)
        _wrap_create_optimizer(trainer_cls)
        _wrap_create_scheduler(trainer_cls)
        table_module = _trainer_optimizer_module()
        table = getattr(table_module, "_OPTIMIZER_HANDLERS", None) if table_module is not None else None
        if table is not None:
            for name in MEMOPT_NAMES:
                table[OptimizerNames(name)] = _table_handler
        _trainer_done = True


def register() -> None:
    """Register ``memopt_adamw``, ``memopt_adam``, ``memopt_sgd``, ``memopt_rmsprop`` and ``memopt_adamw_cm`` now.

    Imports ``transformers.trainer``. ``import hf_memopt`` does not call this: it installs an
    import hook (:mod:`hf_memopt.integrations`) that runs :func:`register_training_args` and
    :func:`register_trainer` when transformers loads those modules. Idempotent. Raises
    :class:`TransformersCompatibilityError` (naming the installed version) if the
    transformers internals this relies on have changed.
    """
    register_training_args()
    register_trainer()


def is_registered() -> bool:
    """True once both parts (``training_args`` and ``trainer``) are registered in this process."""
    return _training_args_done and _trainer_done


__all__ = [
    "LIBRARY_TAG",
    "MEMOPT_NAMES",
    "SUPPORTED_TRANSFORMERS",
    "TransformersCompatibilityError",
    "check_transformers_internals",
    "get_optimizer_cls_and_kwargs",
    "is_registered",
    "load_optimizer_name",
    "register",
    "register_trainer",
    "register_training_args",
    "validate_training_args",
]
