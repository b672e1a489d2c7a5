"""DeepSpeed ZeRO-1/2/3 with a memory-augmented optimizer as the client optimizer.

DeepSpeed hands the client optimizer one flat fp32 partition per param group and rank
(ZeRO-3: per sub-group, one ``step()`` call per sub-group). Each partition holds slices of
several model tensors, and a tensor may straddle ranks. :func:`bind` gives every slice its own
memory unit (``optimizer.bind_segments``) and installs a reducer that all-reduces one vector
of per-tensor squared norms over the data-parallel group, so priorities equal an unsharded
run's. Where the slices live (SPEC section 6):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: ``lp._hp_mapping`` of every
  low-precision parameter gives ``(start, numel)`` of its fragment in this rank's partition;
* ZeRO-3: ``grad_position[param_id] = [sub_group, offset, partition_numel]``; rank ``r`` holds
  elements ``[r * partition_numel, (r + 1) * partition_numel)`` of the flattened tensor.

The client optimizer's partitions carry no link back to DeepSpeed's optimizer, so binding is an
explicit call: :func:`bind` after ``deepspeed.initialize``; ``Trainer`` (hf_memopt's integration)
calls :func:`bind_prepared` after ``accelerator.prepare``. Without it the first step warns (once
per optimizer) and each rank keeps partition-local norms. :func:`unbound_reducer` serves a state
already laid out per partition: each partition is one unit whose priority is the all-reduced
norm of the whole flat group, consistent on every rank but not per tensor, with one warning.

ZeRO-Offload (``offload_optimizer.device="cpu"``, with ``"zero_force_ds_cpu_optimizer": false``):
the partitions and the client's state live in host RAM and the "cpu" executor steps them; the
reducer moves the CPU norm vector to the GPU for an NCCL all-reduce. :func:`bind` logs the offload
and refuses NVMe and partial (``ratio`` < 1) offload; :func:`require_memopt` names the optimizer
that took our place (accelerate swaps in DeepSpeedCPUAdam when the flag is missing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from .reducer import Layout, ShardedNormReducer, TensorMap, Unit, group_key

logger = logging.getLogger("hf_memopt.distributed")

NOT_BOUND_WARNING = (
    "hf_memopt: the optimizer's parameters look like DeepSpeed ZeRO flat partitions, which were not bound "
    "to their model tensors: each rank takes its priorities from its own partition slices, not from whole "
    "tensors, so the run is not the unsharded one. Call hf_memopt.distributed.deepspeed.bind(engine) right "
    "after deepspeed.initialize (accelerate: bind(optimizer) after accelerator.prepare), before loading a "
    "checkpoint and before the first step. (Not DeepSpeed partitions? This fires for tensors with a ds_id, "
    "and for plain non-Parameter tensors while DeepSpeed is imported in a distributed run; wrap them in "
    "torch.nn.Parameter.)"
)

UNBOUND_WARNING = (
    "hf_memopt: DeepSpeed ZeRO partitions were not bound to their model tensors, so each flat "
    "partition gets one priority (the all-reduced norm of its whole param group), consistent on "
    "every rank but not per tensor. Call hf_memopt.distributed.deepspeed.bind(engine) right after "
    "deepspeed.initialize (before loading a checkpoint and before the first step) for exact priorities."
)


@dataclass
class _Partition:
    """One flat partition handed to the client optimizer, and what it holds."""

    tensor: Any  # the fp32 partition (a parameter of the client optimizer)
    client_group: int  # index into the client optimizer's param_groups
    process_group: Any  # the group it is partitioned over
    segments: list[tuple[int, int, int]]  # (start, numel, full-tensor index) held on this rank, by start
    members: list[int]  # full-tensor indices of the whole flat group (every rank's), same on all ranks


def is_zero_optimizer(obj: Any) -> bool:
    """True for a DeepSpeed ZeRO-1/2/3 or BF16 optimizer wrapping a client optimizer."""
    return (type(obj).__module__ or "").startswith("deepspeed.") and (
        hasattr(obj, "single_partition_of_fp32_groups")
        or hasattr(obj, "fp32_partitioned_groups_flat")
        or hasattr(obj, "fp32_groups_flat_partition")
    )


def zero_optimizer_of(obj: Any) -> Any:
    """The DeepSpeed ZeRO optimizer behind an engine, an accelerate wrapper or itself."""
    seen = 0
    while obj is not None and seen < 4:
        if is_zero_optimizer(obj):
            return obj
        obj = getattr(obj, "optimizer", None)
        seen += 1
    raise ValueError(
        "hf_memopt.distributed.deepspeed.bind needs a DeepSpeed engine (or its ZeRO optimizer) with a ZeRO "
        "stage 1, 2 or 3 or bf16 optimizer; without ZeRO the client optimizer sees the original parameters "
        "and needs no binding"
    )


def _rank_in(group: Any) -> int:
    return dist.get_rank(group=group)


def _partitions_zero12(zero: Any) -> tuple[list[_Partition], list[int]]:
    lp_groups = getattr(zero, "bit16_groups", None) or zero.bf16_groups
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
    real_groups = getattr(zero, "real_dp_process_group", None)
    parts: list[_Partition] = []
    tensor_group: list[int] = []
    for i, lps in enumerate(lp_groups):
        segs = []
        first = len(tensor_group)
        for lp in lps:
            tid = len(tensor_group)
            tensor_group.append(i)
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue
            addr = mapping.get_hp_fragment_address()
            if addr.numel:
                segs.append((int(addr.start), int(addr.numel), tid))
        group = real_groups[i] if real_groups else zero.dp_process_group
        parts.append(_Partition(flats[i], i, group, sorted(segs), list(range(first, len(tensor_group)))))
    return parts, tensor_group


def _partitions_zero3(zero: Any) -> tuple[list[_Partition], list[int]]:
    parts: list[_Partition] = []
    tensor_group: list[int] = []
    for sub, params in enumerate(zero.fp16_groups):
        client_group = zero.sub_group_to_group_id[sub]
        getter = getattr(zero, "_get_sub_group_process_group", None)
        group = getter(sub) if getter is not None else zero.dp_process_group
        rank = _rank_in(group)
        segs = []
        first = len(tensor_group)
        for p in params:
            tid = len(tensor_group)
            tensor_group.append(client_group)
            _sub, offset, per_rank = zero.grad_position[zero.get_param_id(p)]
            held = max(0, min(per_rank, p.ds_numel - rank * per_rank))
            if held:
                segs.append((int(offset), int(held), tid))
        members = list(range(first, len(tensor_group)))
        parts.append(_Partition(zero.fp32_partitioned_groups_flat[sub], client_group, group, segs, members))
    return parts, tensor_group


def partitions(zero: Any) -> tuple[list[_Partition], list[int]]:
    """The client optimizer's partitions with their tensor segments, and each full tensor's param group."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return _partitions_zero3(zero)
    return _partitions_zero12(zero)


class DeepSpeedLayout(Layout):
    """The full-tensor vector of a DeepSpeed ZeRO run, the same length on every rank.

    Bound: every model tensor DeepSpeed partitions, then one padding slot per partition (a
    partition that holds no tensor element on this rank is one unit on its slot; no group
    sum counts it). Unbound: one entry per partition, the whole flat group.
    """

    def __init__(self, parts: list[_Partition], tensor_group: list[int], bound: bool) -> None:
        self.parts = parts
        self.bound = bound
        n_real = len(tensor_group)
        self._unit_tensor: dict[tuple[int, int], int] = {}
        self._group_of = {id(part.tensor): part.client_group for part in parts}
        self._members: dict[int, list[int]] = {}  # id(partition tensor) -> its entries in the vector
        self._pg: dict[int, Any] = {}  # id(partition tensor) -> its process group
        for pi, part in enumerate(parts):
            key = id(part.tensor)
            self._pg[key] = part.process_group
            if not bound:
                self._unit_tensor[(key, 0)] = pi
                self._members[key] = [pi]
                continue
            pad = n_real + pi
            self._members[key] = [*part.members, pad]
            if part.segments:
                for si, (_start, _numel, tid) in enumerate(part.segments):
                    self._unit_tensor[(key, si)] = tid
            else:
                self._unit_tensor[(key, 0)] = pad
        if bound:
            self._tensor_group = np.array(tensor_group + [-1] * len(parts), dtype=np.int64)
        else:
            self._tensor_group = np.array([p.client_group for p in parts], dtype=np.int64)
        self._parts_per_group: dict[int, int] = {}
        for part in parts:
            self._parts_per_group[part.client_group] = self._parts_per_group.get(part.client_group, 0) + 1

    def tensor_map(self, units: Sequence[Unit], param_group: dict[int, int]) -> TensorMap:
        unit_tensor = []
        for p, si in units:
            tid = self._unit_tensor.get((id(p), si))
            if tid is None:
                raise RuntimeError(
                    "hf_memopt: the client optimizer holds a tensor DeepSpeed did not partition "
                    "(was bind() called on another engine?)"
                )
            unit_tensor.append(tid)
        # Only the partitions in this call take part: ZeRO-3 steps one sub-group at a time,
        # and every rank calls step() for the same sub-group.
        by_group: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        for key in dict.fromkeys(id(p) for p, _ in units):
            pg = self._pg[key]
            by_group.setdefault(group_key(pg), (pg, []))[1].extend(self._members[key])
        pairs = [(g, np.array(sorted(idx), dtype=np.int64)) for g, idx in by_group.values()]
        return TensorMap(
            unit_tensor=np.array(unit_tensor, dtype=np.int64),
            tensor_group=self._tensor_group,
            n_tensors=len(self._tensor_group),
            unit_group=np.array([self._group_of[id(p)] for p, _ in units], dtype=np.int64),
            reductions=pairs,
            check_groups=pairs,
        )

    def first_use(self, optimizer: Any, units: Sequence[Unit]) -> None:
        # DeepSpeed's universal-checkpoint load writes exp_avg/exp_avg_sq/step straight into the
        # client's state, bypassing load_state_dict (where a missing memory is reported).
        lost = 0
        for p, _si in units:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            clock = state.get("memory_clock")
            if step is not None and clock is not None and float(step) > 0 and int(clock.max()) == 0:
                lost += 1
        if lost:
            from ..engine.state import warn_missing_memory

            warn_missing_memory(lost)

    def validate(self, units: Sequence[Unit], tmap: TensorMap, unit_keys: Sequence[str]) -> None:
        keyed = {self._group_of[id(p)] for (p, _), k in zip(units, unit_keys) if k == "group"}
        for part in self.parts:
            split = self._parts_per_group[part.client_group]
            if split > 1 and part.client_group in keyed:
                raise ValueError(
                    f"hf_memopt: key='group' needs all tensors of param group {part.client_group} in one "
                    f"DeepSpeed ZeRO-3 sub-group, but DeepSpeed split it into {split} "
                    "(zero_optimization.sub_group_size is smaller than the group's parameter count). "
                    "Raise sub_group_size above it, or use key='tensor'."
                )


def _layout(zero: Any, bound: bool) -> DeepSpeedLayout:
    parts, tensor_group = partitions(zero)
    return DeepSpeedLayout(parts, tensor_group, bound)


def bind(engine_or_optimizer: Any, check: bool = False) -> Any:
    """Bind the model tensors' segments inside DeepSpeed's flat partitions; returns the client optimizer.

    Call right after ``deepspeed.initialize`` (or ``accelerator.prepare``), before a checkpoint
    is loaded and before the first step. ``Trainer`` with a ``memopt_*`` optim and
    ``MemOptTrainer`` do it by themselves. Accepts the engine, accelerate's optimizer wrapper
    or DeepSpeed's ZeRO optimizer. Idempotent. ``check``: also run the rank-consistency check.
    Raises ``RuntimeError`` if the client's memory is already laid out otherwise (stepped, or
    loaded from a checkpoint saved unbound): then use :func:`unbound_reducer`.
    """
    zero = zero_optimizer_of(engine_or_optimizer)
    client = zero.optimizer
    if not hasattr(client, "bind_segments"):
        raise TypeError(
            f"hf_memopt.distributed.deepspeed.bind: DeepSpeed's client optimizer is {_qualname(client)}, "
            f"not a hf_memopt memory-augmented optimizer.{_swap_hint(client)}"
        )
    check_offload_supported(zero)
    reducer = getattr(client, "norm_reducer", None)
    if isinstance(reducer, ShardedNormReducer) and isinstance(reducer.layout, DeepSpeedLayout) and reducer.layout.bound:
        return client
    layout = _layout(zero, bound=True)
    for part in layout.parts:
        segs = [(s, n) for s, n, _t in part.segments]
        client.bind_segments(part.tensor, segs or None)
    client.norm_reducer = ShardedNormReducer(client, layout, check=check)
    logger.info(
        "%s: bound to DeepSpeed %s: %d model tensor segment(s) in %d partition(s) on this rank",
        type(client).__name__,
        type(zero).__name__,
        sum(len(part.segments) for part in layout.parts),
        len(layout.parts),
    )
    if is_offloaded(zero):
        from ..engine.executors.cpu_kernel import kernel_threads

        logger.info(
            "%s: ZeRO-Offload: the optimizer state lives in host RAM and the client steps DeepSpeed's fp32 CPU "
            "partitions; executor='auto' runs them on the 'cpu' executor (the C kernel, %d thread(s), "
            "HF_MEMOPT_CPU_THREADS) where it can run the group, else on 'torch' (optimizer.executor_for(group) "
            "says which ran)",
            type(client).__name__,
            kernel_threads(),
        )
    return client


def bind_prepared(obj: Any, expected: str | None = None) -> Any | None:
    """:func:`bind` if ``obj`` wraps a DeepSpeed ZeRO optimizer whose client is ours; else None.

    For integrations (``Trainer``) that prepare any optimizer: after ``accelerator.prepare``.
    ``expected``: the name of the memopt optimizer that was asked for (e.g. ``"memopt_adamw"``);
    then the optimizer that will step must be a memopt one (:func:`require_memopt`), whatever
    DeepSpeed's stage. None: any optimizer passes (nothing was asked of us).
    """
    if expected is not None:
        require_memopt(obj, expected)
    try:
        zero = zero_optimizer_of(obj)
    except ValueError:
        return None
    if not hasattr(zero.optimizer, "bind_segments"):
        return None
    return bind(zero)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _swap_hint(stepping: Any) -> str:
    if "deepspeed.ops" not in (type(stepping).__module__ or ""):
        return ""
    return (
        " Under ZeRO-Offload accelerate replaces a client optimizer by DeepSpeed's CPU optimizer unless the "
        'DeepSpeed config sets "zero_force_ds_cpu_optimizer": false: add that key (hf_memopt\'s Trainer '
        "integration adds it by itself when the config does not set it)."
    )


def stepping_optimizer(obj: Any) -> Any:
    """The optimizer that will run ``step()`` inside accelerate's and DeepSpeed's wrappers around ``obj``."""
    seen = 0
    while seen < 8:
        module = type(obj).__module__ or ""
        inner = getattr(obj, "optimizer", None)
        if inner is None or not (module.startswith("accelerate.") or module.startswith("deepspeed.runtime")):
            return obj
        obj, seen = inner, seen + 1
    return obj


def require_memopt(obj: Any, expected: str) -> Any:
    """The memopt optimizer that will step inside ``obj``; ``RuntimeError`` naming what replaced it otherwise.

    ``obj``: a prepared optimizer (accelerate's wrapper, a DeepSpeed engine or ZeRO optimizer).
    ``expected``: what was asked for, for the message.
    """
    stepping = stepping_optimizer(obj)
    if hasattr(stepping, "bind_segments") and hasattr(stepping, "memory_stats"):
        return stepping
    raise RuntimeError(
        f"hf_memopt: {expected} was asked for, but after accelerator.prepare the optimizer that will step is "
        f"{_qualname(stepping)}: the run would train without the memory.{_swap_hint(stepping)}"
    )


def is_offloaded(zero: Any) -> bool:
    """Whether a DeepSpeed ZeRO optimizer keeps the optimizer state in host RAM (ZeRO-Offload)."""
    return bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))


def check_offload_supported(zero: Any) -> None:
    """``ValueError`` for the optimizer offloads a memopt client cannot run under (NVMe, partial ``ratio``)."""
    if getattr(zero, "swap_optimizer", False):
        raise ValueError(
            "hf_memopt: optimizer offload to NVMe (zero_optimization.offload_optimizer.device='nvme') is not "
            "supported: DeepSpeed swaps only the state tensors it knows, not the memory's. Use device 'cpu'."
        )
    ratio = getattr(zero, "partial_offload", 1.0)
    if getattr(zero, "offload_optimizer", False) and ratio is not None and float(ratio) < 1.0:
        raise ValueError(
            f"hf_memopt: partial optimizer offload (zero_optimization.offload_optimizer.ratio={ratio}) is not "
            "supported: DeepSpeed steps the part it keeps on the accelerator only with DeepSpeedCPUAdam. "
            "Remove 'ratio' (or set it to 1.0)."
        )


def unbound_reducer(optimizer: Any, zero: Any, check: bool = False) -> ShardedNormReducer:
    """One consistent priority per partition (the all-reduced norm of its flat group), with a warning.

    For a client whose memory is already laid out one unit per partition (``bind`` raises
    then). Install it as ``optimizer.norm_reducer``. Warns once per optimizer.
    """
    from .auto import warn_once

    warn_once(optimizer, UNBOUND_WARNING)
    return ShardedNormReducer(optimizer, _layout(zero_optimizer_of(zero), bound=False), check=check)


def strip_memory(checkpoint_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> None:
    """Copy a DeepSpeed ZeRO checkpoint tag folder without the critical-gradient memory.

    DeepSpeed's universal converter (``ds_to_universal``) strips partition padding from every
    tensor of the optimizer state but ``step``, and fails on the memory's 0-dim priorities
    ("narrow(): length must be non-negative"); it would drop the memory anyway. Loading the
    result starts with an empty memory (and a warning).
    """
    import shutil

    import torch

    from ..engine.state import is_memory_key

    src, dst = Path(checkpoint_dir), Path(output_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if not item.name.endswith("optim_states.pt"):
            if item.is_file():
                shutil.copy2(item, dst / item.name)
            continue
        sd = torch.load(item, map_location="cpu", weights_only=False)  # DeepSpeed pickles its own objects
        for entry in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            for key in [k for k in entry if is_memory_key(k)]:
                del entry[key]
        torch.save(sd, dst / item.name)


def to_universal(checkpoint_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str], workers: int = 1) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on a checkpoint saved with a memory-augmented optimizer.

    ``checkpoint_dir``: one tag folder (e.g. ``ckpt/global_step100``). The memory is not carried
    over (the universal format has no place for it): the converted run starts with an empty memory.
    """
    import sys
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main, parse_arguments

    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / Path(checkpoint_dir).name
        strip_memory(checkpoint_dir, stripped)
        argv = sys.argv
        sys.argv = [
            "ds_to_universal",
            "--input_folder",
            str(stripped),
            "--output_folder",
            os.fspath(output_dir),
            "--num_extract_workers",
            str(workers),
            "--num_merge_workers",
            str(workers),
        ]
        try:
            main(parse_arguments())
        finally:
            sys.argv = argv
