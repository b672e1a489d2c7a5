"""The backend-independent half of every sharded norm reducer.

A backend adapter (FSDP2, FSDP1, ZeRO, DeepSpeed) only says how the units of a step map
onto the model's full tensors and how a full tensor's squared norm is assembled from the
ranks (a :class:`Layout`). This module does the rest, the same way for all of them:

* ``key="tensor"``: each unit gets its full tensor's squared norm;
* ``key="group"``: each unit of a param group must end up with the group's sum of full-tensor
  norms, counting every tensor of the group once even when its segments are spread over
  several ranks or when this rank holds none of it. The core sums the norms of a group's units
  that have a gradient, so the reducer hands the whole sum to one such unit (as its square:
  ``sqrt(x * x) == x`` exactly in IEEE arithmetic) and 0 to the others;
* the optional rank-consistency check (``HF_MEMOPT_CHECK_RANKS=1``).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

Unit = tuple[Tensor, int]


@dataclass
class TensorMap:
    """Where the units of one step sit among the model's full tensors.

    Attributes:
        unit_tensor: for every unit, the index of its full tensor in ``[0, n_tensors)``.
        tensor_group: for every full tensor, the index of its param group (-1: in no group sum).
        n_tensors: how many full tensors the layout knows (may exceed the units held here).
        unit_group: for every unit, its group in ``tensor_group``'s numbering; None: the unit's
            index in the optimizer's ``param_groups`` (DeepSpeed ZeRO-1/2 shows the client one
            group at a time, so its layout numbers the groups itself).
        reductions: ``(process group, tensor indices)``: sum those tensors' squared norms over the
            group (one all-reduce per group, in this order, the same on every rank).
        check_groups: ``(process group, tensor indices)`` whose ranks must agree on those tensors
            (``None``: the default group).
    """

    unit_tensor: np.ndarray
    tensor_group: np.ndarray
    n_tensors: int
    unit_group: np.ndarray | None = None
    reductions: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    check_groups: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    #: index tensors already on a device (see :func:`index_on`)
    device_indices: dict[Any, Tensor] = field(default_factory=dict, repr=False)


def index_on(tmap: TensorMap | None, values: Any, device: torch.device) -> Tensor:
    """``values`` as an int64 index tensor on ``device``, made once per layout: a step then copies nothing
    from the host (a blocking copy would synchronise a GPU step, and could not be captured)."""
    host = np.ascontiguousarray(values, dtype=np.int64)
    if tmap is None:
        return torch.from_numpy(host).to(device)
    key = (device, host.shape, host.tobytes())
    index = tmap.device_indices.get(key)
    if index is None:
        index = tmap.device_indices[key] = torch.from_numpy(host).to(device)
    return index


class Layout(ABC):
    """How one backend turns local squared norms into full-tensor squared norms."""

    @abstractmethod
    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        """Map the step's units (``param_group``: ``id(param)`` -> param-group index) to full tensors."""

    def full_sq(self, units: Sequence[Unit], local_sq: Tensor, tmap: TensorMap) -> Tensor:
        """fp64 ``[n_tensors]`` squared norms of the full tensors, identical on every rank.

        ``local_sq`` holds the units' local squared norms (0 where this rank has no gradient).
        By default: scatter them into the tensor vector and run ``tmap.reductions``.
        """
        full = scatter_local(units, local_sq, tmap)
        for group, idx in tmap.reductions:
            if len(idx) == len(full):
                all_reduce(full, group)
            else:
                index = index_on(tmap, idx, full.device)
                part = full[index]
                all_reduce(part, group)
                full[index] = part
        return full

    def first_use(self, optimizer: Any, units: Sequence[Unit]) -> None:  # noqa: B027
        """Called once per distinct set of units, before their first reduction (default: nothing)."""

    def validate(self, units: Sequence[Unit], tmap: TensorMap, unit_keys: Sequence[str]) -> None:  # noqa: B027
        """Raise a clear error for a configuration the layout cannot serve exactly (default: all fine).

        ``unit_keys``: the ``key`` ("tensor"/"group") of each unit's param group.
        """


def scatter_local(units: Sequence[Unit], local_sq: Tensor, tmap: TensorMap) -> Tensor:
    """``[n_tensors]`` vector holding the local squared norm of every tensor held here, 0 elsewhere.

    Every layout gives a rank at most one unit per full tensor, so this is a plain scatter
    (no atomics, hence the same bits on every device).
    """
    out = torch.zeros(tmap.n_tensors, dtype=torch.float64, device=local_sq.device)
    if len(units):
        out[index_on(tmap, tmap.unit_tensor, local_sq.device)] = local_sq.to(torch.float64)
    return out


def group_sums(values: Tensor, tensor_group: np.ndarray, n_groups: int, tmap: TensorMap | None = None) -> Tensor:
    """Per param group, the sum of ``values`` over its tensors, in tensor order.

    A padded gather and a row sum instead of ``index_add_``: CUDA's atomics would sum in a
    varying order, and ranks must get identical bits.
    """
    members = [np.flatnonzero(tensor_group == g) for g in range(n_groups)]
    width = max((len(m) for m in members), default=0)
    index = np.full((n_groups, max(width, 1)), len(values), dtype=np.int64)
    for g, m in enumerate(members):
        index[g, : len(m)] = m
    padded = torch.cat([values, values.new_zeros(1)])
    return padded[index_on(tmap, index, values.device)].sum(dim=1)


def group_key(group: Any) -> tuple[int, ...]:
    """A process group's identity for grouping collectives: its global ranks (meshes differ, groups not)."""
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def all_reduce(t: Tensor, group: Any, op: Any = None) -> None:
    """All-reduce ``t`` in place (SUM by default) on a device the group's backend can use."""
    op = dist.ReduceOp.SUM if op is None else op
    if t.device.type == "cpu" and not _backend_has_cpu(group):
        moved = t.to(_backend_device())
        dist.all_reduce(moved, op=op, group=group)
        t.copy_(moved)
    else:
        dist.all_reduce(t, op=op, group=group)


def _backend_has_cpu(group: Any) -> bool:
    backend = str(dist.get_backend(group))
    return "gloo" in backend or "cpu:" in backend or backend in ("mpi", "ccl", "xccl")


def _backend_device() -> torch.device:
    # NCCL with CPU-resident gradients (optimizer offload): reduce on the current GPU.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardedNormReducer:
    """The ``optimizer.norm_reducer`` of a sharded layout (see :class:`hf_memopt.engine.state.NormReducer`).

    Args:
        optimizer: the memory-augmented optimizer (held weakly; read for groups, keys and the ledgers).
        layout: the backend adapter.
        check: verify on every step that all ranks hold the same norms and memory ledgers
            (one extra small all-reduce per group; for debugging, e.g. on NCCL).
    """

    def __init__(self, optimizer: Any, layout: Layout, check: bool = False) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.layout = layout
        self.check = check
        self._maps: dict[tuple[tuple[int, int], ...], TensorMap] = {}

    def __call__(self, units: Sequence[Unit], local_sq: Tensor) -> Tensor:
        opt = self._optimizer()
        if opt is None:
            raise RuntimeError("the optimizer of this norm reducer no longer exists")
        param_group: dict[int, int] = {}
        key_of: dict[int, str] = {}
        for gi, g in enumerate(opt.param_groups):
            for p in g["params"]:
                param_group[id(p)] = gi
                key_of[id(p)] = g.get("key", "group")
        unit_keys = [key_of[id(p)] for p, _ in units]
        signature = tuple((id(p), si) for p, si in units)
        tmap = self._maps.get(signature)
        if tmap is None:
            tmap = self.layout.tensor_map(units, param_group)
            if tmap.unit_group is None:
                tmap.unit_group = np.array([param_group[id(p)] for p, _ in units], dtype=np.int64)
            self._maps[signature] = tmap
            self.layout.first_use(opt, units)
        self.layout.validate(units, tmap, unit_keys)
        full = self.layout.full_sq(units, local_sq, tmap)
        if self.check:
            from .consistency import check_consistency

            check_consistency(opt, units, full, tmap)
        return per_unit(units, full, tmap, unit_keys)


def per_unit(units: Sequence[Unit], full: Tensor, tmap: TensorMap, unit_keys: Sequence[str]) -> Tensor:
    """The vector the core expects: full squared norm per unit, group sums folded as described above."""
    out = full[index_on(tmap, tmap.unit_tensor, full.device)]
    if "group" not in unit_keys:
        return out
    assert tmap.unit_group is not None
    n_groups = int(max(tmap.tensor_group.max(initial=-1), tmap.unit_group.max(initial=-1))) + 1
    sums = group_sums(full.sqrt(), tmap.tensor_group, n_groups, tmap)
    zero_units: list[int] = []
    first_units: list[int] = []
    first_groups: list[int] = []
    seen: set[int] = set()
    for ui, (p, _si) in enumerate(units):
        if unit_keys[ui] != "group":
            continue
        gi = int(tmap.unit_group[ui])
        if p.grad is not None and gi not in seen:
            seen.add(gi)
            first_units.append(ui)
            first_groups.append(gi)
        else:
            zero_units.append(ui)
    device = full.device
    if zero_units:
        out[index_on(tmap, zero_units, device)] = 0.0
    if first_units:
        out[index_on(tmap, first_units, device)] = sums[index_on(tmap, first_groups, device)].square()
    return out
