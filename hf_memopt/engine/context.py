"""What the memory engine keeps on an optimizer between steps: one typed object the optimizer owns.

``optimizer._engine`` is an :class:`EngineState`. The step (:mod:`.step`), the executors, the checkpoint
hooks and the sharding adapters read and write the memory's bookkeeping through it, and reach into no
other private attribute of the optimizer. Copies and pickles of an optimizer build a new one (what it
holds is keyed by object ids or holds raw addresses), carrying only the segments (by parameter
position), the admission counters and which executor ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .state import Binding, Ledger


class Stats:
    """Admission counters: running totals since the optimizer was built, and where each reader last reset."""

    def __init__(self) -> None:
        self.admitted = 0
        self.rejected = 0
        #: reader -> (admitted, rejected) totals at its last reset
        self.marks: dict[str, tuple[int, int]] = {}
        #: device counters [admitted, rejected] kept by executors that decide on a device
        self.device: dict[torch.device, Tensor] = {}

    def counters(self, device: torch.device) -> Tensor:
        """The int64 [admitted, rejected] counters on ``device`` (the "triton" executor adds to them)."""
        t = self.device.get(device)
        if t is None:
            t = self.device[device] = torch.zeros(2, dtype=torch.int64, device=device)
        return t

    def drain(self) -> None:
        """Move the device counters into the totals (the transfer, only when the counts are read)."""
        for t in self.device.values():
            admitted, rejected = t.tolist()
            self.admitted += admitted
            self.rejected += rejected
            t.zero_()

    def record(self, modes: np.ndarray) -> None:
        """Count one step's decisions (``modes``: MODE_NONE / MODE_FILL / MODE_EVICT per unit)."""
        admitted = int(np.count_nonzero(modes))
        self.admitted += admitted
        self.rejected += len(modes) - admitted

    def since(self, reader: str, reset: bool) -> tuple[int, int]:
        """(admitted, rejected) since ``reader``'s last reset; ``reset`` starts its next count here."""
        self.drain()
        base_admitted, base_rejected = self.marks.get(reader, (0, 0))
        if reset:
            self.marks[reader] = (self.admitted, self.rejected)
        return self.admitted - base_admitted, self.rejected - base_rejected


@dataclass(eq=False)
class EngineState:
    """The memory engine's bookkeeping on one optimizer (see the module docstring)."""

    #: id(param) -> its units' ``(start, numel)`` (a flat ZeRO partition holding slices of several tensors)
    segments: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: admission counters for ``memory_stats()``
    stats: Stats = field(default_factory=Stats)
    #: param group index -> the executor that ran it at the last step
    ran: dict[int, str] = field(default_factory=dict)
    #: host ledgers by id(priority_0) (:func:`hf_memopt.engine.state.ledger_of`)
    ledgers: dict[int, Ledger] = field(default_factory=dict)
    #: states whose ledger lives on a device (the "triton" executor): id(priority_0) -> (binding, ledger, row, units)
    device_ledgers: dict[int, tuple[Binding, Any, int, int]] = field(default_factory=dict)
    #: executors' caches: state views (:mod:`.guard`), kernel tables, Triton layouts; dropped by :meth:`invalidate`
    cache: dict[Any, Any] = field(default_factory=dict)
    #: bumped by :meth:`invalidate`: caches built under another version are stale
    layout_version: int = 0
    #: a load in progress: the memory keys the pre-hook took out, and the saved parameter ids
    pending_memory: tuple[dict[Any, dict[str, Any]], list[Any]] | None = None
    #: per param group (by id): the (topc, buffer_dtype, memory on, layout version) it was last checked against
    group_settings: dict[int, tuple[int, torch.dtype | None, bool, int]] = field(default_factory=dict)

    def invalidate(self) -> None:
        """Drop everything cached about the state's layout (after a load, a new group, new segments)."""
        self.layout_version += 1
        self.cache = {}
        # every ledger is gathered again from the state's scalars, host and device alike
        self.ledgers = {}
        self.device_ledgers = {}

    def copy_for(self, segments: dict[int, list[tuple[int, int]]]) -> EngineState:
        """A new state for a copy of the optimizer: its ``segments`` (keyed by the copy's parameters), these
        counters and executor names, nothing keyed by this optimizer's objects."""
        return EngineState(
            segments=segments, stats=self.stats, ran=dict(self.ran), layout_version=self.layout_version + 1
        )


__all__ = ["EngineState", "Stats"]
