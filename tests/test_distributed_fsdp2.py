"""FSDP2 (``fully_shard``) on 2 and 3 gloo ranks: parity with an unsharded run, checkpoints, resharding."""

from __future__ import annotations

import copy
import os
import zlib
from typing import Any

import dist_utils as du
import pytest
import torch
from executors_available import require_or_skip

pytestmark = pytest.mark.multiprocess


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _train(model: torch.nn.Module, opt: Any, rank: int, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        du.loss_fn(model, *du.batch(step, rank)).backward()
        opt.step()


def parity_worker(rank: int, world_size: int) -> dict[str, Any]:
    with du.LogRecords() as logs:
        out = _parity(rank, world_size)
    out["logs"] = logs
    return out


def _parity(rank: int, world_size: int) -> dict[str, Any]:
    from hf_memopt import MemoryAugmentedAdamW
    from hf_memopt.distributed import RankDivergenceError, ShardedNormReducer, dtensor
    from hf_memopt.distributed.dtensor import DTensorLayout

    out: dict[str, Any] = {"diff": {}}
    for config in du.parity_configs():
        key, agg, buf = config[:3]
        model = _shard(du.make_model())
        cls, agg_kw = du.optimizer_for(agg)
        opt = cls(du.param_groups(model), key=key, buffer_dtype=buf, **agg_kw, **du.executor_kw(config), **du.OPT_KW)
        if config[:3] == ("group", "mean", "bf16"):
            opt.check_rank_consistency = True  # the debug switch must not fire on a correct run
        _train(model, opt, rank, du.STEPS)
        ref = du.reference_run(key, agg, buf, world_size)
        out["diff"][config] = du.max_diff(_full(model), ref)
        if len(config) > 3:
            out.setdefault("ran", {})[config] = opt.executor_for(0)
        out.setdefault("reducer", type(opt.norm_reducer.layout).__name__)
        out.setdefault("empty_shard", any(p.to_local().numel() == 0 for p in model.parameters()))

    # Control: shard-local norms (what the engine does without a reducer) make the ranks' priorities differ,
    # and the consistency check catches it.
    class LocalOnly(DTensorLayout):
        def tensor_map(self, units, param_group):  # noqa: ANN001, ANN202
            tmap = super().tensor_map(units, param_group)
            tmap.reductions = []
            return tmap

    model = _shard(du.make_model())
    opt = MemoryAugmentedAdamW(du.param_groups(model), key="tensor", **du.OPT_KW)
    opt.norm_reducer = ShardedNormReducer(opt, LocalOnly())
    _train(model, opt, rank, 1)
    out["local_priorities"] = [float(opt.state[p]["priority_0"]) for p in model.parameters()]
    opt.norm_reducer = ShardedNormReducer(opt, LocalOnly(), check=True)
    try:
        _train(model, opt, rank, 1)
        out["check_raised"] = None
    except RankDivergenceError as err:
        out["check_raised"] = str(err)

    # Auto-detection off (the optimizer attribute): DTensors without the explicit call are refused with
    # the call to make; with it the run is exact.
    for attach in (False, True):
        model = _shard(du.make_model())
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        opt.auto_sharding = False
        if attach:
            dtensor.attach(opt)
        try:
            _train(model, opt, rank, du.STEPS)
            out[f"off_{attach}"] = du.max_diff(_full(model), du.reference_run("group", "mean", "fp32", world_size))
        except ValueError as err:
            out[f"off_{attach}"] = str(err)
    return out


@pytest.fixture(scope="module")
def parity() -> list[dict[str, Any]]:
    return du.run(parity_worker, 2)


@pytest.mark.parametrize("config", du.PARITY_CONFIGS + du.TRITON_CONFIGS, ids=lambda c: "-".join(c))
def test_fsdp2_matches_unsharded(parity: list[dict[str, Any]], config: tuple[str, ...]) -> None:
    if config in du.TRITON_CONFIGS:
        require_or_skip("triton")
        assert parity[0]["ran"][config] == "triton"  # DTensor local shards, norms through the reducer's all-reduce
    assert parity[0]["reducer"] == "DTensorLayout"
    assert parity[0]["empty_shard"] or parity[1]["empty_shard"]
    for rank in range(2):
        assert parity[rank]["diff"][config] < 1e-6, (rank, parity[rank]["diff"][config])


def test_fsdp2_auto_detection_logs_and_can_be_switched_off(parity: list[dict[str, Any]]) -> None:
    for res in parity:
        assert any("DTensor parameters (FSDP2/tensor parallel)" in m for m in res["logs"]), res["logs"]
        assert "hf_memopt.distributed.dtensor.attach(optimizer)" in res["off_False"]
        assert "optimizer.auto_sharding = False" in res["off_False"]
        assert res["off_True"] < 1e-6


def test_shard_local_norms_diverge_and_are_caught(parity: list[dict[str, Any]]) -> None:
    assert parity[0]["local_priorities"] != parity[1]["local_priorities"]
    assert parity[0]["check_raised"] and "ranks disagree" in parity[0]["check_raised"]
    assert parity[1]["check_raised"] == parity[0]["check_raised"]


# -- checkpoints ------------------------------------------------------------------------------

SAVED_STEPS, MORE_STEPS = 5, 4
CKPT_KW = dict(key="group", buffer_dtype="bf16", **du.OPT_KW)


def _ckpt_optimizer(model: torch.nn.Module, aggregation: str, executor: str = "auto") -> Any:
    cls, agg_kw = du.optimizer_for(aggregation)
    return cls(du.param_groups(model), **agg_kw, executor=executor, **CKPT_KW)


def _grad_step(model: torch.nn.Module, opt: Any, step: int) -> None:
    """A gradient that does not depend on the world size: the full tensor, then sharded like the param."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(f"{step}:{name}".encode()))
        full = torch.randn(p.shape, generator=g)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)
    opt.step()


def _full_optim(model: torch.nn.Module, opt: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a snapshot: CPU scalars (step, priorities) come back as the live state tensors, which later steps mutate
    return copy.deepcopy(sd)


def _plugin() -> Any:
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = PartialState(cpu=True)
    return state, FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def save_worker(
    rank: int, world_size: int, root: str, aggregation: str = "mean", executor: str = "auto"
) -> dict[str, Any] | None:
    import torch.distributed.checkpoint as dcp
    from accelerate.utils import save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _shard(du.make_model())
    opt = _ckpt_optimizer(model, aggregation, executor)
    for step in range(SAVED_STEPS):
        _grad_step(model, opt, step)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=f"{root}/dcp",
    )
    full = _full_optim(model, opt)
    model_full = _full(model)
    if rank == 0:
        torch.save({"optim": full, "model": model_full}, f"{root}/full.pt")
    state, plugin = _plugin()
    save_fsdp_optimizer(plugin, state, opt, model, f"{root}/accelerate")
    for step in range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS):
        _grad_step(model, opt, step)
    final = _full(model)  # a collective: every rank
    return {"final": final, "stats": opt.memory_stats(), "ran": opt.executor_for(0)} if rank == 0 else None


def load_worker(
    rank: int, world_size: int, root: str, ways: list[str], aggregation: str = "mean", executor: str = "auto"
) -> dict[str, Any]:
    """Load the 2-rank checkpoint on ``world_size`` ranks each way in ``ways``, then train on."""
    import torch.distributed.checkpoint as dcp
    from accelerate.utils import load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out: dict[str, Any] = {}
    for how in ways:
        saved = torch.load(f"{root}/full.pt", weights_only=True)
        snapshot = copy.deepcopy(saved["optim"])  # loading shares tensors (as torch does): later steps mutate them
        model = _shard(du.make_model(seed=1))  # other initial weights: everything must come from the checkpoint
        opt = _ckpt_optimizer(model, aggregation, executor)
        full_opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, saved["model"], options=full_opts)
        if how == "dcp":
            sd = {"optim": get_optimizer_state_dict(model, opt)}  # runs DCP's zero-gradient warm-up step
            dcp.load(sd, checkpoint_id=f"{root}/dcp")
            set_optimizer_state_dict(model, opt, sd["optim"])
        elif how == "full":
            set_optimizer_state_dict(model, opt, saved["optim"], options=full_opts)
        else:
            state, plugin = _plugin()
            load_fsdp_optimizer(plugin, state, opt, model, f"{root}/accelerate")
        loaded = _full_optim(model, opt)
        for step in range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS):
            _grad_step(model, opt, step)
        out[how] = {"loaded": loaded, "final": _full(model), "saved": snapshot, "ran": opt.executor_for(0)}
    return out


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for name, entry in a["state"].items():
        other = b["state"][name]
        assert entry.keys() == other.keys(), name
        for k, v in entry.items():
            w = other[k]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and v.shape == w.shape, (name, k, v.dtype, w.dtype)
                assert torch.equal(v, w), (name, k)
            else:
                assert v == w, (name, k)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("fsdp2_ckpt"))
    results = du.run(save_worker, 2, root)
    return root, results[0]


LOAD_WAYS = {2: ["dcp", "full", "accelerate"], 1: ["dcp"], 3: ["dcp", "full"]}


@pytest.fixture(scope="module")
def loaded(checkpoint: tuple[str, dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    return {ws: du.run(load_worker, ws, checkpoint[0], ways) for ws, ways in LOAD_WAYS.items()}


@pytest.mark.parametrize(("world_size", "how"), [(ws, how) for ws, ways in LOAD_WAYS.items() for how in ways])
def test_fsdp2_checkpoint_round_trip(
    checkpoint: tuple[str, dict[str, Any]], loaded: dict[int, list[dict[str, Any]]], world_size: int, how: str
) -> None:
    root, expected = checkpoint
    results = [r[how] for r in loaded[world_size]]
    saved = results[0]["saved"]
    first = next(iter(saved["state"].values()))
    assert {"memory_2", "memory_sum", "priority_2", "memory_count"} <= first.keys()
    assert first["memory_0"].dtype == torch.bfloat16 and first["priority_0"].dtype == torch.float32
    # exact, with the saved dtypes (bf16 slots, fp32 priorities); a full state dict lands on rank 0 only
    _assert_same_state(results[0]["loaded"], saved)
    for res in results:  # and training goes on as if never interrupted, on any world size
        assert du.max_diff(res["final"], expected["final"]) < 1e-6
    assert os.path.isdir(os.path.join(root, "accelerate"))


@pytest.fixture(scope="module")
def cm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Critical Momenta: saved on 2 ranks, loaded with DCP on 3 (resharded), trained on."""
    root = str(tmp_path_factory.mktemp("fsdp2_cm_ckpt"))
    saved = du.run(save_worker, 2, root, "cm")[0]
    return root, saved, du.run(load_worker, 3, root, ["dcp"], "cm")


def test_fsdp2_critical_momenta_checkpoint_reshards_exactly(
    cm_checkpoint: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, expected, loaded = cm_checkpoint
    results = [r["dcp"] for r in loaded]
    saved = results[0]["saved"]
    first = next(iter(saved["state"].values()))
    assert {"memory_2", "memory_sum", "priority_2", "exp_avg"} <= first.keys()
    assert first["memory_0"].dtype == torch.bfloat16 and first["exp_avg"].dtype == torch.float32
    assert saved["param_groups"][0]["aggregation"] == "sum"  # the fixed m + kappa S / n, recorded for the engine
    _assert_same_state(results[0]["loaded"], saved)
    for res in results:
        assert du.max_diff(res["final"], expected["final"]) < 1e-6


@pytest.fixture(scope="module")
def triton_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The "triton" executor (its ledger a device table whose rows the state's scalars view): saved with DCP
    on 2 ranks, loaded on 3 (resharded), trained on."""
    require_or_skip("triton")
    root = str(tmp_path_factory.mktemp("fsdp2_triton_ckpt"))
    saved = du.run(save_worker, 2, root, "mean", "triton")[0]
    return saved, du.run(load_worker, 3, root, ["dcp"], "mean", "triton")


def test_fsdp2_triton_checkpoint_reshards_exactly(
    triton_checkpoint: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    expected, loaded = triton_checkpoint
    results = [r["dcp"] for r in loaded]
    assert expected["ran"] == "triton" and all(r["ran"] == "triton" for r in results)
    _assert_same_state(results[0]["loaded"], results[0]["saved"])
    for res in results:
        assert du.max_diff(res["final"], expected["final"]) < 1e-6
