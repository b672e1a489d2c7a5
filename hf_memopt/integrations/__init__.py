"""Integrations of the hf_memopt optimizers with other libraries.

* :mod:`hf_memopt.integrations.transformers`: ``optim="memopt_adamw"`` etc. for the 🤗
  ``Trainer``/``TrainingArguments``/``HfArgumentParser`` (and TRL's config classes);
* :mod:`hf_memopt.integrations.optim_args`: strict ``optim_args`` parsing (no transformers
  import);
* :mod:`hf_memopt.integrations.model_card`: the optimizer section of model cards.

This package module imports nothing heavy: ``import hf_memopt`` must stay importable, and
fast, with or without transformers installed. It therefore does not import transformers to
register the ``memopt_*`` names; :func:`install_transformers_hook` (called by
``import hf_memopt``) puts an import hook on ``sys.meta_path`` instead. When transformers
itself loads

* ``transformers.training_args``, the hook runs
  :func:`~hf_memopt.integrations.transformers.register_training_args` on it (the enum
  members, ``TrainingArguments`` validation, ``--optim_args`` help): from then on
  ``TrainingArguments(optim="memopt_adamw")`` and ``HfArgumentParser``'s ``--optim`` choices
  (including TRL's config classes) accept the names;
* ``transformers.trainer``, the hook runs
  :func:`~hf_memopt.integrations.transformers.register_trainer` on it (the optimizer
  dispatch of ``Trainer``).

A module transformers had already loaded before ``import hf_memopt`` is registered at once.
The hook removes itself from ``sys.meta_path`` once both modules are registered. A
registration that fails (a transformers whose internals moved) is a ``RuntimeWarning``
naming the transformers version, never an error in the user's import: the optimizers stay
usable in any training loop, only ``optim="memopt_*"`` is then unavailable.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

from .._env import env_flag

#: Set to 1 to skip the transformers registration on ``import hf_memopt`` (no import hook).
SKIP_ENV = "HF_MEMOPT_SKIP_TRANSFORMERS"

#: Modules of transformers the hook waits for, in import order, and the function of
#: :mod:`hf_memopt.integrations.transformers` that registers with each (given the module).
HOOKED_MODULES: dict[str, str] = {
    "transformers.training_args": "register_training_args",
    "transformers.trainer": "register_trainer",
}

_lock = threading.RLock()
_pending: set[str] = set()
_failed = False


def _skipped() -> bool:
    return env_flag(SKIP_ENV)


def _transformers_version() -> str:
    return str(getattr(sys.modules.get("transformers"), "__version__", "unknown"))


def _run_part(module_name: str, module: Any) -> None:
    """Register with ``module`` (just loaded); a failure is a warning, never an exception."""
    global _failed
    with _lock:
        _pending.discard(module_name)
        if not _pending:
            _uninstall()
        if _failed:  # one warning per process; the later parts depend on the first
            return
        try:
            from . import transformers as integration

            getattr(integration, HOOKED_MODULES[module_name])(module)
        except Exception as err:  # the user's import of transformers must not fail because of us
            _failed = True
            message = str(err)
            integration = sys.modules.get(f"{__name__}.transformers")
            if not isinstance(err, getattr(integration, "TransformersCompatibilityError", ())):
                message = (
                    f"hf_memopt could not register its optimizers with transformers {_transformers_version()} "
                    f"({type(err).__name__}: {err})."
                )
            warnings.warn(
                f"{message} The hf_memopt optimizers still work in any training loop; only "
                "optim='memopt_*' in TrainingArguments/Trainer is unavailable.",
                RuntimeWarning,
                stacklevel=2,
            )


class _RegisterAfterExec:
    """Loader wrapper: run the module's own loader, then register with the module."""

    def __init__(self, loader: Any, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # From here on the module shows transformers' own loader (inspect, importlib.resources).
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        _run_part(self._module_name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class TransformersImportHook:
    """``sys.meta_path`` finder that wraps the loader of the modules in :data:`HOOKED_MODULES`.

    It finds nothing itself: it asks the finders after it for the real spec and only
    replaces that spec's loader with one that registers after the module has executed.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _pending:
            return None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader, fullname)
                return spec
        return None


_hook = TransformersImportHook()


def _uninstall() -> None:
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install_transformers_hook() -> None:
    """Register the ``memopt_*`` names with transformers, now or when transformers loads.

    Called by ``import hf_memopt``; imports no transformers module itself. For each module of
    :data:`HOOKED_MODULES`: already loaded, register at once; else wait for it with
    :class:`TransformersImportHook`. Idempotent. ``HF_MEMOPT_SKIP_TRANSFORMERS=1`` skips it.
    """
    if _skipped():
        return
    with _lock:
        for name in HOOKED_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                _run_part(name, module)
            elif not _failed:
                _pending.add(name)
        if _pending and _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def hook_pending() -> tuple[str, ...]:
    """The transformers modules the hook still waits for (empty once registered or skipped)."""
    with _lock:
        return tuple(sorted(_pending))


__all__ = ["HOOKED_MODULES", "SKIP_ENV", "TransformersImportHook", "hook_pending", "install_transformers_hook"]
