"""The optimizer step as torch.compile sees it: one call Dynamo does not trace (a graph break).

Imported only from inside a compiled region, where ``torch._dynamo`` is already loaded: importing it
at ``import hf_memopt`` would cost seconds for every user, compiling or not.
"""

from __future__ import annotations

from typing import Any

import torch


def _step(optimizer: Any, closure: Any) -> Any:
    return optimizer._step(closure)


#: ``optimizer._step(closure)``, run eagerly even when called from a function being compiled
eager_step = torch._dynamo.disable(_step, recursive=True)
