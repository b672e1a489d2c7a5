"""Refuse a DeepSpeed config that would replace ``memopt_*``, and keep ours under ZeRO-Offload.

When the DeepSpeed config has an ``"optimizer"`` section, transformers hands DeepSpeed a
placeholder (``accelerate.utils.DummyOptim``) and never calls ``create_optimizer``: the
``optim`` argument is silently ignored and the run trains without any memory. With a
memopt name that must be an error, raised where the arguments are checked, before any
DeepSpeed import (so it also fires on machines without DeepSpeed).

The config can come from ``TrainingArguments.deepspeed`` (a dict, a path to a JSON file,
a JSON string or base64-encoded JSON: the forms accelerate's ``HfDeepSpeedConfig``
reads) or, under ``accelerate launch --use_deepspeed --deepspeed_config_file F``, from
the environment variables accelerate sets for the launched processes.

ZeRO-Offload (``zero_optimization.offload_optimizer.device: "cpu"``): accelerate replaces any
client optimizer by ``DeepSpeedCPUAdam`` (``map_pytorch_optim_to_deepspeed``) unless the config
sets ``"zero_force_ds_cpu_optimizer": false``, without a word; the run then trains plain Adam.
:func:`check_offload` refuses what cannot run with a memopt optimizer (NVMe, partial ``ratio``,
SuperOffload, the flag set to true) where the arguments are checked, and
:func:`keep_client_optimizer` sets the flag to false (logged) right before ``prepare``. The
memopt optimizer then steps DeepSpeed's fp32 CPU partitions on the "cpu" executor. Outside the
Trainer (a user's own ``accelerator.prepare(model, optimizer)``), :func:`guard_accelerate_swap`
makes accelerate's swap refuse a memopt optimizer with the fix in the message, instead of
replacing it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

from .._env import env_flag

logger = logging.getLogger("hf_memopt.distributed")

#: The DeepSpeed config key that makes DeepSpeed (and accelerate) accept a client optimizer under offload.
FORCE_FLAG = "zero_force_ds_cpu_optimizer"


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
    if config is None:
        return
    check_offload(config, optim_name)
    if "optimizer" not in config:
        return
    section = config["optimizer"]
    ds_type = section.get("type", "?") if isinstance(section, Mapping) else section
    raise ValueError(
        f"optim={optim_name!r} conflicts with the DeepSpeed config, whose 'optimizer' section "
        f"(type {ds_type!r}) would silently replace it: transformers then never builds {optim_name}. "
        f"Remove the 'optimizer' section from the DeepSpeed config to train with {optim_name} "
        "(DeepSpeed then wraps the Trainer's optimizer), or drop optim to use DeepSpeed's optimizer."
    )


def offload_device(config: Mapping[str, Any]) -> str:
    """``zero_optimization.offload_optimizer.device`` of a DeepSpeed config, lower case ("none" when absent)."""
    zero = config.get("zero_optimization")
    section = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
    device = section.get("device") if isinstance(section, Mapping) else None
    return str(device if device is not None else "none").lower()


def check_offload(config: Mapping[str, Any], optim_name: str) -> None:
    """Raise ``ValueError`` for an optimizer offload a memopt optimizer cannot run under.

    Supported: ``offload_optimizer.device`` "cpu" with the whole state offloaded. Refused, each with
    what to change: "nvme" (DeepSpeed swaps the state tensors it knows, not the memory's), a partial
    ``ratio`` < 1 (ZeRO-3 then asserts DeepSpeedCPUAdam), ``super_offload`` (its own CPU Adam), and
    ``"zero_force_ds_cpu_optimizer": true``, which makes accelerate replace the optimizer by
    DeepSpeedCPUAdam without a word. ``"auto"`` values are left to be filled in by accelerate.
    """
    device = offload_device(config)
    if device in ("none", "auto"):
        return
    section = config["zero_optimization"]["offload_optimizer"]
    if device == "nvme":
        raise ValueError(
            f"optim={optim_name!r} does not support zero_optimization.offload_optimizer.device='nvme': DeepSpeed "
            "swaps only the state tensors it knows to NVMe, not the memory's. Use device 'cpu' (the state then "
            "lives in host RAM and the 'cpu' executor steps it) or no optimizer offload."
        )
    if device != "cpu":
        raise ValueError(
            f"optim={optim_name!r} supports zero_optimization.offload_optimizer.device 'cpu' or 'none'; got {device!r}"
        )
    ratio = section.get("ratio", 1.0)
    if ratio != "auto" and float(ratio) < 1.0:
        raise ValueError(
            f"optim={optim_name!r} does not support partial optimizer offload "
            f"(zero_optimization.offload_optimizer.ratio={ratio}): DeepSpeed steps the part it keeps on the "
            "accelerator only with DeepSpeedCPUAdam. Remove 'ratio' (or set it to 1.0) to offload the whole state."
        )
    if section.get("super_offload", False) is True:
        raise ValueError(
            f"optim={optim_name!r} does not support zero_optimization.offload_optimizer.super_offload, which "
            "steps with DeepSpeed's own CPU Adam. Remove 'super_offload'."
        )
    if config.get(FORCE_FLAG) is True:
        raise ValueError(
            f'optim={optim_name!r} with ZeRO-Offload and "{FORCE_FLAG}": true: accelerate would silently replace '
            f'{optim_name} by DeepSpeedCPUAdam (no memory). Set "{FORCE_FLAG}": false (or remove the key: '
            "hf_memopt's Trainer integration then sets it to false) to train with the memopt optimizer on CPU."
        )


def keep_client_optimizer(config: MutableMapping[str, Any], optimizer_name: str) -> bool:
    """Under ZeRO-Offload to CPU, make DeepSpeed and accelerate keep the client optimizer; True if it did.

    Checks the config (:func:`check_offload`), then sets ``"zero_force_ds_cpu_optimizer": false`` in
    it when absent, and logs so at INFO (logger ``hf_memopt.distributed``). ``config``: the dict
    accelerate will hand to ``deepspeed.initialize`` (``accelerator.state.deepspeed_plugin.deepspeed_config``).
    Without ZeRO-Offload: nothing to do, False.
    """
    check_offload(config, optimizer_name)
    if offload_device(config) != "cpu":
        return False
    if config.get(FORCE_FLAG) is not False:
        config[FORCE_FLAG] = False
        logger.info(
            'hf_memopt: ZeRO-Offload: set "%s": false in the DeepSpeed config so that accelerate and DeepSpeed '
            "keep %s (instead of swapping in DeepSpeedCPUAdam); it steps the fp32 CPU partitions on the 'cpu' executor",
            FORCE_FLAG,
            optimizer_name,
        )
    return True


def guard_accelerate_swap() -> None:
    """Make accelerate's ZeRO-Offload swap (``accelerate.accelerator.map_pytorch_optim_to_deepspeed``, which
    replaces any client optimizer by DeepSpeedCPUAdam unless the config sets ``"zero_force_ds_cpu_optimizer":
    false``) refuse a memopt optimizer, before training, with the fix in the message.

    Called when a memopt optimizer is built; acts only where accelerate's ``accelerator`` module is loaded
    already (a script that builds its Accelerator's optimizer has imported it), imports nothing, and wraps
    once. Other optimizers go through accelerate's own function unchanged."""
    module = sys.modules.get("accelerate.accelerator")
    original = getattr(module, "map_pytorch_optim_to_deepspeed", None)
    if original is None or getattr(original, "_hf_memopt_guard", False):
        return

    @functools.wraps(original)
    def map_pytorch_optim_to_deepspeed(optimizer: Any) -> Any:
        from ..optim.base import MemoryAugmentedOptimizer  # deferred: no import cycle with the optimizers

        if isinstance(optimizer, MemoryAugmentedOptimizer):
            raise ValueError(
                f"accelerate would replace {type(optimizer).__name__} by DeepSpeedCPUAdam under ZeRO-Offload "
                f'(offload_optimizer.device "cpu"), and the run would train without its memory. Set '
                f'"{FORCE_FLAG}": false in the DeepSpeed config: DeepSpeed then keeps the client optimizer, and '
                "hf_memopt steps the offloaded state with its CPU kernel (docs/distributed.md, offload)"
            )
        return original(optimizer)

    map_pytorch_optim_to_deepspeed._hf_memopt_guard = True  # type: ignore[attr-defined]
    module.map_pytorch_optim_to_deepspeed = map_pytorch_optim_to_deepspeed  # type: ignore[union-attr]
