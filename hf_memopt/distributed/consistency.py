"""Debug switch: verify that every rank takes the same memory decisions.

With ``HF_MEMOPT_CHECK_RANKS=1`` (read at the first step) or
:func:`check_rank_consistency`, each step all-reduces, per process group, the full-tensor
norms and a fingerprint of every tensor's memory ledger (filled slots, sum of priorities,
steps taken) as MAX of ``[x, -x]``, and raises on every rank at once if any rank differs.
Equal norms and equal ledgers imply equal decisions (they are a deterministic function of
both), so a divergence is caught at the step it starts, or at the latest the next one.
Costs one small collective and one host transfer per step: a debugging aid (e.g. on NCCL),
not for production runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._env import env_flag
from .reducer import TensorMap, Unit, all_reduce

ENV_VAR = "HF_MEMOPT_CHECK_RANKS"
_QUANTITIES = ("full-tensor squared norm", "stored gradients", "sum of priorities", "steps taken")


def requested() -> bool:
    """True when ``HF_MEMOPT_CHECK_RANKS`` asks for the check."""
    return env_flag(ENV_VAR, False)


class RankDivergenceError(RuntimeError):
    """Ranks disagree on the memory's inputs or state: their training has silently diverged."""


def _ledger_rows(optimizer: Any, units: Sequence[Unit], tmap: TensorMap) -> np.ndarray:
    """``[3, n_tensors]`` ledger fingerprint per tensor held here; -inf where this rank has none."""
    topc = {id(p): int(g["topc"]) for g in optimizer.param_groups for p in g["params"]}
    rows = np.full((3, tmap.n_tensors), -np.inf)
    for ui, (p, si) in enumerate(units):
        state = optimizer.state.get(p, {})
        if "memory_count" not in state:
            continue
        t = tmap.unit_tensor[ui]
        rows[0, t] = float(state["memory_count"].reshape(-1)[si])
        rows[1, t] = float(sum(float(state[f"priority_{i}"].reshape(-1)[si]) for i in range(topc[id(p)])))
        rows[2, t] = float(state["memory_clock"].reshape(-1)[si])
    return rows


def check_consistency(optimizer: Any, units: Sequence[Unit], full: Tensor, tmap: TensorMap) -> None:
    """Raise :class:`RankDivergenceError` (on all ranks) if the ranks of any check group disagree."""
    ledger = torch.as_tensor(_ledger_rows(optimizer, units, tmap), dtype=torch.float64, device=full.device)
    values = torch.cat([full.reshape(1, -1).to(torch.float64), ledger])  # [4, n_tensors]
    for group, idx in tmap.check_groups or [(None, np.arange(tmap.n_tensors))]:
        if not len(idx):
            continue
        x = values[:, torch.as_tensor(idx, device=full.device)]
        both = torch.cat([x, -x])
        all_reduce(both, group, op=torch.distributed.ReduceOp.MAX)
        hi, lo = both[:4], -both[4:]
        bad = (hi != lo).nonzero()
        if len(bad):
            q, j = (int(v) for v in bad[0].tolist())
            tensor = int(idx[j])
            raise RankDivergenceError(
                f"hf_memopt: ranks disagree on the {_QUANTITIES[q]} of tensor #{tensor} "
                f"(min {float(lo[q, j])!r}, max {float(hi[q, j])!r}; {len(bad)} value(s) differ). "
                "Their memory decisions, and so their training, have diverged: check that every rank "
                "reduces gradients the same way (DDP/FSDP/DeepSpeed) and loaded the same checkpoint."
            )
