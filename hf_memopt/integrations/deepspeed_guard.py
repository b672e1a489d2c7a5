"""Refuse a DeepSpeed config whose own ``"optimizer"`` section would replace ``memopt_*``.

When the DeepSpeed config has an ``"optimizer"`` section, transformers hands DeepSpeed a
placeholder (``accelerate.utils.DummyOptim``) and never calls ``create_optimizer``: the
``optim`` argument is silently ignored and the run trains without any memory. With a
memopt name that must be an error, raised where the arguments are checked, before any
DeepSpeed import (so it also fires on machines without DeepSpeed).

The config can come from ``TrainingArguments.deepspeed`` (a dict, a path to a JSON file,
a JSON string or base64-encoded JSON: the forms accelerate's ``HfDeepSpeedConfig``
reads) or, under ``accelerate launch --use_deepspeed --deepspeed_config_file F``, from
the environment variables accelerate sets for the launched processes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

from .._env import env_flag


def _load_config(config: Any) -> Mapping[str, Any] | None:
    """The DeepSpeed config as a dict, or None if it cannot be read here.

    Unreadable configs are left to DeepSpeed/accelerate, which report them themselves.
    """
    if config is None or config is False:
        return None
    if isinstance(config, Mapping):
        return config
    hf_config = getattr(config, "config", None)  # an HfDeepSpeedConfig object
    if isinstance(hf_config, Mapping):
        return hf_config
    if not isinstance(config, (str, os.PathLike)):
        return None
    text = os.fspath(config)
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return json.load(f)
    for decode in (lambda s: s, lambda s: base64.urlsafe_b64decode(s).decode("utf-8")):
        try:
            loaded = json.loads(decode(text))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if isinstance(loaded, Mapping):
            return loaded
    return None


def deepspeed_config_of(args: Any) -> Mapping[str, Any] | None:
    """The DeepSpeed config the Trainer will use with ``args``, if any."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return _load_config(hf_config)
    from_args = _load_config(getattr(args, "deepspeed", None))
    if from_args is not None:
        return from_args
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        return _load_config(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    return None


def check_deepspeed_optimizer(args: Any, optim_name: str) -> None:
    """Raise ``ValueError`` if the DeepSpeed config of ``args`` brings its own optimizer."""
    config = deepspeed_config_of(args)
    if config is None or "optimizer" not in config:
        return
    section = config["optimizer"]
    ds_type = section.get("type", "?") if isinstance(section, Mapping) else section
    raise ValueError(
        f"optim={optim_name!r} conflicts with the DeepSpeed config, whose 'optimizer' section "
        f"(type {ds_type!r}) would silently replace it: transformers then never builds {optim_name}. "
        f"Remove the 'optimizer' section from the DeepSpeed config to train with {optim_name} "
        "(DeepSpeed then wraps the Trainer's optimizer), or drop optim to use DeepSpeed's optimizer."
    )
