"""Decisions taken on the host: one batched norm pass, one optional all-reduce, one transfer.

The "torch" executor, and the "cpu" executor under a norm reducer, decide this way: every unit of
every such param group gets its local squared norm (and, where the buffer dtype is narrower than the
gradient's, the largest ``|x|`` of the value x it would store: g, or under Critical Momenta the
momentum, advanced before planning) in one batched computation per device; a reducer (sharded runs)
turns them into full-tensor norms with one collective; one device-to-host transfer brings them to
the host, where :mod:`.rule` decides. The plans are then applied by the executors and committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import MemoryConfig
from . import rule
from . import state as st
from .norms import local_sq_norms

#: A unit of a step: (parameter, index in the group's lists, segment index, start or -1 for the whole tensor)
Unit = tuple[Tensor, int, int, int]


@dataclass
class HostPlan:
    """One param group's units that have a gradient this step, and their decisions."""

    units: list[Unit]
    states: list[dict[str, Any]]  # optimizer.state[param] per unit
    rows: list[tuple[st.Ledger, int]]  # ledger rows per unit
    pri: np.ndarray  # gathered ledger rows, updated by the commit
    at: np.ndarray
    d: rule.Decisions

    def commit(self, cfg: MemoryConfig) -> None:
        rule.commit(self.rows, self.pri, self.at, self.d, cfg.decay)


def needs_max(cfg: MemoryConfig, grad_dtype: torch.dtype) -> bool:
    """Whether a finite gradient of ``grad_dtype`` can overflow the group's buffer dtype (SPEC 1.3)."""
    buffer = cfg.buffer_dtype or grad_dtype
    return buffer != grad_dtype and torch.finfo(buffer).max < torch.finfo(grad_dtype).max


def plan_groups(
    opt: Any, works: Sequence[Any], reducer: st.NormReducer | None, all_memory_groups: Sequence[Any]
) -> None:
    """Set ``work.plan`` for every work in ``works`` (param groups with the memory on).

    ``all_memory_groups``: every memory-enabled work of the step; under a reducer they all take
    part in its layout (every rank must hand it the same units), whoever decides them.
    """
    if not works:
        return
    planned = {id(w) for w in works}
    layout = all_memory_groups if reducer is not None else works
    units: list[tuple[Tensor, int]] = []  # every unit of the reducer's layout
    unit_group: list[int] = []
    views: list[Tensor] = []
    max_views: list[Tensor] = []  # per view, the tensor whose max-abs decides castability
    view_pos: list[int] = []
    view_max: list[bool] = []
    entries: dict[int, list[tuple[int, Unit]]] = {}
    key_group: list[bool] = []
    for gi, w in enumerate(layout):
        key_group.append(w.cfg.key == "group")
        out = entries.setdefault(id(w), [])
        lists = w.lists
        index = {id(p): i for i, p in enumerate(lists["params"])}
        # Under a reducer every parameter of the group takes a place, gradient or not, so that
        # the vector has the same layout on every rank; otherwise only those with a gradient.
        for p in w.group["params"] if reducer is not None else lists["params"]:
            i = index.get(id(p))
            bounds = opt._engine.segments.get(id(p))
            for si, (start, numel) in enumerate(bounds or [(-1, -1)]):
                if i is not None:
                    g = lists["grads"][i]
                    view_pos.append(len(units))
                    views.append(st.local_tensor(g) if start < 0 else st.unit_view(g, start, numel, False))
                    # the castability test (SPEC 1.3) reads what is stored: g, or the advanced momentum
                    # under Critical Momenta (SPEC 1b.4), whose max-abs is only known after its lerp
                    x = g if w.admit is None else w.admit[i]
                    max_views.append(views[-1] if x is g else st.unit_view(x, start, numel, start < 0))
                    # a finite k says g is finite, not m: m stays non-finite after one non-finite g
                    # (SPEC 1.3 then refuses every m), so m is always checked
                    view_max.append(needs_max(w.cfg, x.dtype) or x is not g)
                    out.append((len(units), (p, i, si, start)))
                units.append((p, si))
                unit_group.append(gi)
    if not units:
        return
    own_max = all(m is v for m, v in zip(max_views, views))
    sq_local, max_local = local_sq_norms(views, with_max=any(view_max) and own_max)
    if any(view_max) and not own_max:
        sq_x, max_local = local_sq_norms(max_views, with_max=True)  # one more batched pass, same device
        assert max_local is not None
        # a max-abs reduction may pass over a NaN; the sum of squares does not
        max_local = torch.where(sq_x.isfinite().to(max_local.device), max_local, float("inf"))
    if max_local is not None and reducer is not None:
        # A shard's max-abs is not the tensor's: mark a unit whose local part cannot be cast as
        # non-finite, which the all-reduce carries to every rank (nothing of its priority group is
        # stored in that step, on every rank alike).
        bad = _not_castable(layout, entries, max_local, view_max, view_pos, sq_local.device)
        if bad is not None:
            sq_local = torch.where(bad, torch.full_like(sq_local, float("inf")), sq_local)
    if reducer is None and len(view_pos) == len(units):
        sq = sq_local
    else:
        sq = torch.zeros(len(units), dtype=torch.float64, device=sq_local.device)
        if views:
            sq[torch.tensor(view_pos, device=sq.device)] = sq_local
        if reducer is not None:
            sq = reducer(units, sq)
    if max_local is not None and reducer is None:
        host = torch.cat([sq.sqrt(), max_local.to(sq.device, torch.float64)]).cpu().numpy()  # the one transfer
        norms, max_abs = host[: len(units)], host[len(units) :]  # fp64: exact for fp32 and fp64 maxima
    else:
        norms, max_abs = sq.sqrt().cpu().numpy(), None  # the one device-to-host transfer of the step
    groups = np.array(unit_group)
    has = np.zeros(len(units), dtype=bool)
    has[view_pos] = True
    k = rule.priorities(norms, groups, has, np.array(key_group)[groups])
    position = {u: v for v, u in enumerate(view_pos)}  # unit -> its view
    for w in layout:
        out = entries[id(w)]
        if id(w) not in planned or not out:
            continue
        cfg = w.cfg
        states = [opt.state[p] for _, (p, *_rest) in out]
        rows = [
            (st.ledger_of(s, cfg.topc, opt._engine.ledgers), si) for s, (_, (_p, _i, si, _start)) in zip(states, out)
        ]
        pri, at, count, clock = st.gather(rows)
        castable = None
        if max_abs is not None and (cfg.buffer_dtype is not None or w.admit is not None):
            castable = _castable(max_abs[[position[u] for u, _ in out]], cfg)
        d = rule.decide(pri, count, clock, k[[u for u, _ in out]], cfg, castable)
        w.plan = HostPlan([unit for _, unit in out], states, rows, pri, at, d)


def _not_castable(
    layout: Sequence[Any],
    entries: dict[int, list[tuple[int, Unit]]],
    max_local: Tensor,
    view_max: list[bool],
    view_pos: list[int],
    device: torch.device,
) -> Tensor | None:
    """Per view: True where the value it stores (g, or m) is not finite in its group's buffer dtype (None: none is)."""
    position = {u: v for v, u in enumerate(view_pos)}
    bad = torch.zeros(len(view_pos), dtype=torch.bool)
    host_max = max_local.cpu().numpy()
    for w in layout:
        if w.cfg.buffer_dtype is None and w.admit is None:
            continue
        idx = [position[u] for u, _ in entries[id(w)] if view_max[position[u]]]
        if idx:
            bad[idx] = torch.from_numpy(~_castable(host_max[idx], w.cfg))
    return bad.to(device) if bool(bad.any()) else None


def _castable(max_abs: np.ndarray, cfg: MemoryConfig) -> np.ndarray:
    """Whether values of these max-abs are finite once stored (in ``buffer_dtype``; None: their own dtype)."""
    if cfg.buffer_dtype is None:
        return np.isfinite(max_abs)
    return rule.finite_in(max_abs, cfg.buffer_dtype)
