"""The end of a multi-process script: destroy the default process group while the interpreter is alive."""

from __future__ import annotations

import time

import torch


def shutdown_process_group() -> None:
    """Destroy the default process group, if one is up; call it last in a script run by ``accelerate launch``
    or ``torchrun`` (``Trainer`` scripts included: ``Trainer`` leaves the group up).

    Without it, torch 2.13 with gloo sometimes aborts a rank at exit after a successful run ("terminate called
    without an active exception", pytorch/pytorch#190489). DDP's gradient all-reduces capture the backward's
    Python context, and a gloo worker thread drops it after the collective, which takes the GIL; if the
    interpreter is already finalizing, that thread aborts the process. ``destroy_process_group`` does not
    join those threads, so on gloo this also releases the GIL for a moment to let them finish (measured with
    ``examples/accelerate/train_tiny.py``: 3 aborts in 43 launches without the pause, none in 100 with it).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        time.sleep(0.2)
