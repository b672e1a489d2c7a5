"""Integrations of the hf_memopt optimizers with other libraries.

* :mod:`hf_memopt.integrations.transformers`: ``optim="memopt_adamw"`` etc. for the 🤗
  ``Trainer``/``TrainingArguments``/``HfArgumentParser`` (and TRL's config classes);
* :mod:`hf_memopt.integrations.optim_args`: strict ``optim_args`` parsing (no transformers
  import);
* :mod:`hf_memopt.integrations.model_card`: the optimizer section of model cards.

This package module imports nothing heavy: ``import hf_memopt`` must stay importable,
and fast, without transformers installed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

#: Set to 1 to skip the transformers registration on ``import hf_memopt`` (e.g. to use the
#: optimizers in a custom loop with a transformers version this integration rejects).
SKIP_ENV = "HF_MEMOPT_SKIP_TRANSFORMERS"


def register_transformers_if_available() -> bool:
    """Register the ``memopt_*`` optim names with transformers if it is installed.

    Called by ``import hf_memopt``. Returns True if registered. A transformers that is
    installed but cannot be imported (broken environment) gives a warning, not an error,
    so the optimizers stay usable; a transformers whose internals changed raises
    :class:`~hf_memopt.integrations.transformers.TransformersCompatibilityError`.
    """
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        import transformers.trainer  # noqa: F401  (the import that can fail in a broken environment)
    except ImportError as err:
        warnings.warn(
            f"hf_memopt: transformers is installed but failed to import ({err}); optim='memopt_*' is not registered.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    from .transformers import register

    register()
    return True


__all__ = ["SKIP_ENV", "register_transformers_if_available"]
