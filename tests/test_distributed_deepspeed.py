"""DeepSpeed ZeRO-1/2/3 with MemoryAugmentedAdamW as the client optimizer, on 2 gloo ranks (CPU)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import dist_utils as du
import pytest
import torch
from executors_available import require_or_skip

pytestmark = pytest.mark.multiprocess
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks its accelerator then
deepspeed = pytest.importorskip("deepspeed")


def ds_config(stage: int, **zero: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the reference does not clip
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def engine_for(stage: int, bind: bool = True, seed: int = 0, zero: dict[str, Any] | None = None, **opt_kw: Any) -> Any:
    from hf_memopt.distributed import deepspeed as ds_adapter

    model = du.make_model(seed)
    cls, agg_kw = du.optimizer_for(opt_kw.pop("aggregation", "mean"))
    opt = cls(du.param_groups(model), **agg_kw, **{**du.OPT_KW, **opt_kw})
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, **(zero or {})))
    if bind:
        ds_adapter.bind(engine)
    return engine


train, full_params = du.ds_train, du.ds_full_params


def client(engine: Any) -> Any:
    return engine.optimizer.optimizer


def parity_worker(rank: int, world_size: int, stage: int, configs: list[tuple[str, str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"diff": {}}
    for config in configs:
        key, agg, buf = config[:3]
        engine = engine_for(stage, key=key, aggregation=agg, buffer_dtype=buf, **du.executor_kw(config))
        train(engine, rank, range(du.STEPS))
        out["diff"][config] = du.max_diff(full_params(engine), du.reference_run(key, agg, buf, world_size))
        opt = client(engine)
        if len(config) > 3:
            assert opt.executor_for(0) == config[3]  # segments of the flat partition, on the "triton" executor
        out["units"] = [opt.state[p]["priority_0"].numel() for g in opt.param_groups for p in g["params"]]
    return out


STAGE_CONFIGS = {1: du.PARITY_CONFIGS[::3], 2: du.with_triton(du.PARITY_CONFIGS), 3: du.with_triton(du.PARITY_CONFIGS)}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"zero{s}")
def parity(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    stage = request.param
    return stage, du.run(parity_worker, 2, stage, STAGE_CONFIGS[stage])


def test_deepspeed_bound_matches_unsharded(parity: tuple[int, list[dict[str, Any]]]) -> None:
    stage, results = parity
    for res in results:
        assert res["diff"].keys() == set(STAGE_CONFIGS[stage])
        bad = {c: d for c, d in res["diff"].items() if not d < 1e-6}
        assert not bad, bad
    if stage < 3:  # a partition straddles tensors: several memory units in it on some rank
        assert any(n > 1 for res in results for n in res["units"])


def _priorities(opt: Any) -> list[list[float]]:
    return [
        [float(v) for v in opt.state[p]["priority_0"].reshape(-1)]
        for g in opt.param_groups
        for p in g["params"]
        if p in opt.state
    ]


def scenarios_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from hf_memopt.distributed import deepspeed as ds_adapter

    out: dict[str, Any] = {}

    from hf_memopt import MemoryAugmentedAdamW

    model = du.make_model()
    strict = {k: v for k, v in ds_config(2).items() if k != "zero_allow_untested_optimizer"}
    try:
        deepspeed.initialize(model=model, optimizer=MemoryAugmentedAdamW(model.parameters()), config=strict)
        out["untested_error"] = ""
    except AssertionError as err:
        out["untested_error"] = str(err)

    # No bind(): the partitions cannot be bound from the optimizer's side. The first step warns, once per
    # optimizer (a second optimizer in the same process gets its own warning), with auto-detection on or off,
    # and each rank goes on with its partition-local norms.
    for name, stage, env in (("zero2", 2, None), ("zero2_again", 2, None), ("zero2_off", 2, "0"), ("zero3", 3, None)):
        if env is not None:
            os.environ["HF_MEMOPT_AUTO_SHARDING"] = env
        try:
            with warnings.catch_warnings(record=True) as caught, du.LogRecords() as logs:
                warnings.simplefilter("always")
                engine = engine_for(stage, bind=False)
                train(engine, rank, range(3))
        finally:
            os.environ.pop("HF_MEMOPT_AUTO_SHARDING", None)
        out[f"unbound_{name}"] = {
            "warnings": [str(w.message) for w in caught if "hf_memopt" in str(w.message)],
            "logs": logs,
            "reducer": client(engine).norm_reducer,
        }

    # bind() logs what it bound.
    with du.LogRecords() as logs:
        engine_for(2)
    out["bind_logs"] = logs

    # Unbound fallback: one priority per partition, the same on every rank, one warning per optimizer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = engine_for(2, bind=False)
        opt = client(engine)
        opt.norm_reducer = ds_adapter.unbound_reducer(opt, engine.optimizer, check=True)
        ds_adapter.unbound_reducer(opt, engine, check=True)  # the same optimizer again: no second warning
        train(engine, rank, range(4))
    out["fallback_warnings"] = [str(w.message) for w in caught if str(w.message) == ds_adapter.UNBOUND_WARNING]
    out["fallback_priorities"] = _priorities(opt)

    # ZeRO-3 with several sub-groups per param group: key="tensor" exact, key="group" refused.
    engine = engine_for(3, key="tensor", zero={"sub_group_size": 20})
    out["subgroups"] = len(engine.optimizer.fp16_groups)
    train(engine, rank, range(du.STEPS))
    out["subgroup_diff"] = du.max_diff(full_params(engine), du.reference_run("tensor", "mean", "fp32", world_size))
    engine = engine_for(3, key="group", zero={"sub_group_size": 20})
    try:
        train(engine, rank, range(1))
        out["subgroup_group_error"] = None
    except ValueError as err:
        out["subgroup_group_error"] = str(err)

    # Checkpoints, same world size: save, go on; a fresh engine loads and must go on identically,
    # whether bound before the load (as Trainer does) or right after it.
    # Critical Momenta (its memory holds momenta) and, where Triton runs, the "triton" executor too.
    variants = [("adamw", {}), ("cm", {"aggregation": "cm"})]
    if du.triton_runs_here():
        variants.append(("triton", {"executor": "triton"}))
    for stage in (2, 3):
        for variant, kw in variants:
            path = f"{root}/z{stage}" if variant == "adamw" else f"{root}/z{stage}_{variant}"
            engine = engine_for(stage, buffer_dtype="bf16", **kw)
            train(engine, rank, range(5))
            # what DeepSpeed's universal converter requires of a checkpoint
            engine.module.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
            engine.save_checkpoint(path, tag="s5")
            train(engine, rank, range(5, 9))
            expected = full_params(engine)
            for bind_first in (True, False):
                engine = engine_for(stage, bind=bind_first, seed=1, buffer_dtype="bf16", **kw)
                engine.load_checkpoint(path, tag="s5")
                if not bind_first:
                    ds_adapter.bind(engine)
                train(engine, rank, range(5, 9))
                out[f"ckpt{stage}_{bind_first}_{variant}"] = du.max_diff(full_params(engine), expected)
                state = client(engine).state[next(iter(client(engine).state))]
                out[f"ckpt{stage}_dtype_{variant}"] = state["memory_0"].dtype
                out[f"ckpt{stage}_count_{variant}"] = int(state["memory_count"].reshape(-1).max())
                out[f"ckpt{stage}_ran_{variant}"] = client(engine).executor_for(0)

    # Universal checkpoint: DeepSpeed's converter keeps only fp32/exp_avg/exp_avg_sq.
    if rank == 0:  # DeepSpeed's converter fails on the memory's 0-dim priorities; to_universal strips them first
        ds_adapter.to_universal(f"{root}/z2/s5", f"{root}/z2/s5_universal")
    torch.distributed.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = du.make_model(1)
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        cfg = {**ds_config(2), "checkpoint": {"load_universal": True}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        ds_adapter.bind(engine)
        engine.load_checkpoint(f"{root}/z2", tag="s5_universal")
        train(engine, rank, range(5, 6))
    out["universal_warnings"] = [str(w.message) for w in caught if "memory" in str(w.message)]
    out["universal_counts"] = [
        int(opt.state[p]["memory_count"].reshape(-1).max()) for g in opt.param_groups for p in g["params"]
    ]
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return du.run(scenarios_worker, 2, str(tmp_path_factory.mktemp("ds")))


@pytest.mark.parametrize("name", ["zero2", "zero2_again", "zero2_off", "zero3"])
def test_deepspeed_unbound_warns_once_per_optimizer_naming_bind(scenarios: list[dict[str, Any]], name: str) -> None:
    from hf_memopt.distributed.deepspeed import NOT_BOUND_WARNING

    for res in scenarios:
        got = res[f"unbound_{name}"]
        assert got["warnings"] == [NOT_BOUND_WARNING], got["warnings"]
        assert "hf_memopt.distributed.deepspeed.bind(engine)" in NOT_BOUND_WARNING
        assert got["reducer"] is None
        off = " (auto-detection off: HF_MEMOPT_AUTO_SHARDING=0)" if name == "zero2_off" else ""
        want = f"MemoryAugmentedAdamW: parameters look like unbound DeepSpeed ZeRO partitions: no norm reducer{off}"
        assert got["logs"] == [want], got["logs"]


def test_deepspeed_bind_logs_at_info(scenarios: list[dict[str, Any]]) -> None:
    for res in scenarios:
        assert any("bound to DeepSpeed DeepSpeedZeroOptimizer" in m for m in res["bind_logs"]), res["bind_logs"]


def test_deepspeed_unbound_is_consistent_and_warns_once(scenarios: list[dict[str, Any]]) -> None:
    assert len(scenarios[0]["fallback_warnings"]) == 1
    assert scenarios[0]["fallback_priorities"] == scenarios[1]["fallback_priorities"]
    assert all(len(p) == 1 for p in scenarios[0]["fallback_priorities"])  # one unit per partition


def test_deepspeed_zero3_sub_groups(scenarios: list[dict[str, Any]]) -> None:
    res = scenarios[0]
    assert res["subgroups"] > 2  # the weights group alone spans several sub-groups
    assert res["subgroup_diff"] < 1e-6
    assert "sub_group_size" in res["subgroup_group_error"] and "key='tensor'" in res["subgroup_group_error"]


@pytest.mark.parametrize("variant", ["adamw", "cm", "triton"])
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("bind_first", [True, False])
def test_deepspeed_checkpoint_round_trip(
    scenarios: list[dict[str, Any]], stage: int, bind_first: bool, variant: str
) -> None:
    """Saved after 5 steps, loaded into a fresh engine: the next 4 steps equal the uninterrupted run's
    (MemoryAugmentedAdamW; CriticalMomentaAdamW, whose memory holds momenta; the "triton" executor)."""
    if variant == "triton":
        require_or_skip("triton")
    for res in scenarios:
        assert res[f"ckpt{stage}_{bind_first}_{variant}"] < 1e-6
        assert res[f"ckpt{stage}_dtype_{variant}"] == torch.bfloat16
        assert res[f"ckpt{stage}_count_{variant}"] == du.OPT_KW["topc"]  # the memory came back full
        assert res[f"ckpt{stage}_ran_{variant}"] == ("triton" if variant == "triton" else "cpu")


def test_deepspeed_universal_checkpoint_starts_empty_with_a_warning(scenarios: list[dict[str, Any]]) -> None:
    for res in scenarios:
        assert any("memory starts empty" in w for w in res["universal_warnings"]), res["universal_warnings"]
        assert max(res["universal_counts"]) == 1  # only the first step after the load is stored


def test_deepspeed_refuses_our_optimizer_without_the_untested_flag(scenarios: list[dict[str, Any]]) -> None:
    """DeepSpeed checks the exact optimizer type: docs say to set the flag (Trainer/accelerate set it)."""
    assert "zero_allow_untested_optimizer" in scenarios[0]["untested_error"]
