"""FSDP2 (``fully_shard``) and other DTensor layouts: the full norm from the local shards.

Every rank holds every parameter (a DTensor whose local shard may be uneven or empty), so
the units are the same on every rank and unit ``i`` is full tensor ``i``. A DTensor gradient
sharded along mesh dimension ``d`` (``Shard(k)``) is summed over that dimension's process
group; a replicated dimension needs nothing; a ``Partial`` gradient cannot be summed as
squared norms and is refused. Tensors are grouped by process group, not by mesh object:
every ``fully_shard`` call builds its own mesh over the same group.

The parameters carry everything needed (placements and meshes), so the first step attaches
this layout by itself; :func:`attach` does it explicitly (needed when sharding
auto-detection is switched off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .reducer import Layout, ShardedNormReducer, TensorMap, Unit, group_key


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _mesh_groups(t: Any) -> tuple[list[Any], list[Any]]:
    """(groups to sum over, groups whose ranks must agree) for a DTensor's placements."""
    mesh = t.device_mesh
    summed, agree = [], []
    for dim, placement in enumerate(t.placements):
        group = mesh.get_group(mesh_dim=dim)
        agree.append(group)
        if placement.is_shard():
            summed.append(group)
        elif placement.is_partial():
            raise ValueError(
                "hf_memopt: a parameter's gradient is a Partial DTensor; its full norm cannot be summed "
                "from the shards. Reduce the gradient first (e.g. FSDP2's default reduce-scatter, or "
                "grad.redistribute(placements=[Replicate()]/[Shard(0)]) before optimizer.step())."
            )
    return summed, agree


class DTensorLayout(Layout):
    """Units are whole DTensor parameters, identical on every rank."""

    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        n = len(units)
        reduce: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        agree: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        plain: list[int] = []
        for ui, (p, _si) in enumerate(units):
            if not is_dtensor(p):
                plain.append(ui)  # a replicated plain tensor next to the DTensors: nothing to sum
                continue
            summed, together = _mesh_groups(p.grad if is_dtensor(p.grad) else p)
            for g in summed:
                reduce.setdefault(group_key(g), (g, []))[1].append(ui)
            for g in together:
                agree.setdefault(group_key(g), (g, []))[1].append(ui)
        checks = [(g, np.array(idx, dtype=np.int64)) for g, idx in agree.values()]
        if plain:
            checks.append((None, np.array(plain, dtype=np.int64)))
        return TensorMap(
            unit_tensor=np.arange(n, dtype=np.int64),
            tensor_group=np.array([param_group[id(p)] for p, _ in units], dtype=np.int64),
            n_tensors=n,
            reductions=[(g, np.array(idx, dtype=np.int64)) for g, idx in reduce.values()],
            check_groups=checks,
        )


def attach(optimizer: Any, check: bool = False) -> ShardedNormReducer:
    """Make ``optimizer`` exact on DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).

    Call after building the optimizer (after ``fully_shard``), before its first step.
    ``check``: also run the rank-consistency check every step. Returns the reducer.
    """
    reducer = ShardedNormReducer(optimizer, DTensorLayout(), check=check)
    optimizer.norm_reducer = reducer
    return reducer
