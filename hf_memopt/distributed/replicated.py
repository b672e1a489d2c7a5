"""Replicated parameters (DDP): nothing to reduce; used only to run the rank-consistency check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .reducer import Layout, TensorMap, Unit


class ReplicatedLayout(Layout):
    """Every rank holds every tensor whole: local norms are full norms."""

    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        n = len(units)
        return TensorMap(
            unit_tensor=np.arange(n, dtype=np.int64),
            tensor_group=np.array([param_group[id(p)] for p, _ in units], dtype=np.int64),
            n_tensors=n,
            check_groups=[(None, np.arange(n, dtype=np.int64))],
        )
