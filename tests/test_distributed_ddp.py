"""DDP and torch's ZeroRedundancyOptimizer on 2 gloo ranks; the rank-consistency switch; what the
sharding auto-detection logs, and its off switch."""

from __future__ import annotations

from typing import Any

import dist_utils as du
import pytest
import torch

pytestmark = pytest.mark.multiprocess


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model)


def _train(model: torch.nn.Module, opt: Any, rank: int, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        du.loss_fn(model, *du.batch(step, rank)).backward()
        opt.step()


def worker(rank: int, world_size: int) -> dict[str, Any]:
    with du.LogRecords() as logs:
        out = _scenarios(rank, world_size)
    out["logs"] = logs
    return out


def _scenarios(rank: int, world_size: int) -> dict[str, Any]:
    import os

    from torch.distributed.optim import ZeroRedundancyOptimizer

    from hf_memopt import MemoryAugmentedAdamW
    from hf_memopt.distributed import RankDivergenceError, zero

    out: dict[str, Any] = {"ddp": {}, "zero": {}}
    for key, agg, buf in du.PARITY_CONFIGS[::3]:
        model = du.make_model()
        cls, agg_kw = du.optimizer_for(agg)
        opt = cls(du.param_groups(model), key=key, buffer_dtype=buf, **agg_kw, **du.OPT_KW)
        ddp = _ddp(model)
        _train(ddp, opt, rank, du.STEPS)
        params = {n: p.detach() for n, p in model.named_parameters()}
        out["ddp"][(key, agg, buf)] = du.max_diff(params, du.reference_run(key, agg, buf, world_size))
        out["ddp_reducer"] = opt.norm_reducer  # None: DDP needs no collective of ours

    for key, agg, buf in du.PARITY_CONFIGS:
        model = du.make_model()
        ddp = _ddp(model)
        cls, agg_kw = du.optimizer_for(agg)
        opt = ZeroRedundancyOptimizer(
            du.param_groups(model), optimizer_class=cls, key=key, buffer_dtype=buf, **agg_kw, **du.OPT_KW
        )
        if key == "group":  # the group sum spans tensors other ranks optimize: the explicit call
            zero.attach(opt)
        _train(ddp, opt, rank, du.STEPS)
        params = {n: p.detach() for n, p in model.named_parameters()}
        out["zero"][(key, agg, buf)] = du.max_diff(params, du.reference_run(key, agg, buf, world_size))
        layout = getattr(opt.optim.norm_reducer, "layout", None)
        out.setdefault("zero_layout", {})[key] = type(layout).__name__ if layout is not None else None
        out["zero_local"] = sum(1 for p in opt.optim.state if "memory_sum" in opt.optim.state[p])

    # The debug switch: silent under DDP, raises on every rank when the ranks' gradients differ.
    os.environ["HF_MEMOPT_CHECK_RANKS"] = "1"
    try:
        model = du.make_model()
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        _train(_ddp(model), opt, rank, 3)
        out["check_ddp"] = type(opt.norm_reducer).__name__
        model = du.make_model()
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        try:
            _train(model, opt, rank, 3)  # no DDP: every rank steps on its own gradient
            out["check_raised"] = None
        except RankDivergenceError as err:
            out["check_raised"] = str(err)
    finally:
        del os.environ["HF_MEMOPT_CHECK_RANKS"]

    # The off switch: plain DDP needs nothing either way, and the log says it was off.
    os.environ["HF_MEMOPT_AUTO_SHARDING"] = "0"
    try:
        model = du.make_model()
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        _train(_ddp(model), opt, rank, 1)
        out["off_reducer"] = opt.norm_reducer
    finally:
        del os.environ["HF_MEMOPT_AUTO_SHARDING"]
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return du.run(worker, 2)


def test_ddp_matches_unsharded_without_a_collective(results: list[dict[str, Any]]) -> None:
    for res in results:
        assert res["ddp_reducer"] is None
        assert all(d < 1e-6 for d in res["ddp"].values()), res["ddp"]


@pytest.mark.parametrize("config", du.PARITY_CONFIGS, ids=lambda c: "-".join(c))
def test_zero_redundancy_matches_unsharded(results: list[dict[str, Any]], config: tuple[str, str, str]) -> None:
    for res in results:
        assert res["zero"][config] < 1e-6, res["zero"][config]


def test_zero_redundancy_shards_the_memory(results: list[dict[str, Any]]) -> None:
    assert results[0]["zero_layout"] == {"tensor": None, "group": "ZeroLayout"}
    local = [res["zero_local"] for res in results]
    assert sum(local) == 6 and min(local) > 0  # each tensor's memory lives on exactly one rank


def test_rank_check_is_silent_under_ddp_and_catches_divergence(results: list[dict[str, Any]]) -> None:
    assert results[0]["check_ddp"] == "ShardedNormReducer"
    assert results[0]["check_raised"] and "ranks disagree" in results[0]["check_raised"]
    assert results[1]["check_raised"] == results[0]["check_raised"]


def test_auto_detection_logs_what_it_found_at_info(results: list[dict[str, Any]]) -> None:
    for res in results:
        logs = res["logs"]
        assert any("replicated tensors (DDP): no norm reducer;" in m and "zero.attach" in m for m in logs), logs
        assert any("attached to a ZeroRedundancyOptimizer" in m for m in logs), logs
        assert any("rank-consistency check only" in m for m in logs), logs
        assert any("auto-detection off: HF_MEMOPT_AUTO_SHARDING=0" in m for m in logs), logs
        assert res["off_reducer"] is None
