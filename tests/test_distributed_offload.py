"""Optimizer state in host RAM: DeepSpeed ZeRO-Offload and FSDP2 ``CPUOffloadPolicy`` (issue 23).

Each offloaded run (2 gloo ranks, CPU; DeepSpeed with ``DS_ACCELERATOR=cpu``) is held to the same
run without offload, bit for bit (parameters and every state tensor: the offloaded optimizer steps
the same fp32 values, only where they live differs), and to the unsharded optimizer on the full
batch (``du.reference_run``, 1e-6). The "cpu" executor must be the one that steps the offloaded
state (``optimizer.executor_for``). Checkpoints: offload -> offload and offload -> no offload
continue bit-identically. Under ``Trainer`` a ZeRO-Offload config without
``"zero_force_ds_cpu_optimizer": false`` must keep the memopt optimizer (accelerate would swap in
DeepSpeedCPUAdam), and a prepared optimizer that is not ours is an error naming it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import dist_utils as du
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks its accelerator then
deepspeed = pytest.importorskip("deepspeed")

WORLD = 2
SAVE_AT = 5


# -- DeepSpeed, plain ----------------------------------------------------------------------------


def ds_config(stage: int, offload: bool, **top: Any) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        **top,
    }


def engine_for(stage: int, offload: bool, seed: int = 0, optimizer: Any = None, **top: Any) -> Any:
    from hf_memopt import MemoryAugmentedAdamW
    from hf_memopt.distributed import deepspeed as ds_adapter

    model = du.make_model(seed)
    opt = optimizer(du.param_groups(model)) if optimizer else MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, offload, **top))
    if optimizer is None:
        ds_adapter.bind(engine)
    return engine


train, full_params = du.ds_train, du.ds_full_params


def partitions_of(engine: Any) -> list[torch.Tensor]:
    """The fp32 partitions DeepSpeed hands the client (ZeRO-3 sets the client's param groups only inside step)."""
    zero = engine.optimizer
    return list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)


def client_state(engine: Any) -> list[dict[str, torch.Tensor]]:
    """Every state tensor of the client optimizer, by partition (what the offloaded optimizer holds)."""
    client = engine.optimizer.optimizer
    return [
        {k: v.detach().clone() for k, v in client.state[p].items() if torch.is_tensor(v)}
        for p in partitions_of(engine)
        if p in client.state
    ]


def same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k].cpu(), y[k].cpu()) for k in x) for x, y in zip(a, b)
    )


def ran_cpu(executors: list[str | None]) -> bool:
    """Every param group that ran, ran on "cpu" (ZeRO-1/2 show the client one group at a time, as index 0)."""
    ran = [e for e in executors if e is not None]
    return bool(ran) and set(ran) == {"cpu"}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def measured_host_bytes(stage: int, rank: int) -> dict[str, int]:
    """Host bytes of a ZeRO-Offload run: the client's state tensors and DeepSpeed's own host buffers."""
    from hf_memopt import MemoryAugmentedAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256, bias=False), torch.nn.Tanh(), torch.nn.Linear(256, 256, bias=False)
    )
    opt = MemoryAugmentedAdamW(model.parameters(), **du.OPT_KW)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, offload=True))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x).square().mean())
    engine.step()
    zero = engine.optimizer
    if stage == 3:
        flats, grads, staging = zero.fp32_partitioned_groups_flat, [zero.grad_partitions_flat_buffer], []
    else:
        flats = zero.single_partition_of_fp32_groups
        grads, staging = [f.grad for f in flats], zero.param_buffer_of_bit16_for_cpu_offload_groups

    def nbytes(tensors: list[torch.Tensor]) -> int:
        assert all(t.device.type == "cpu" for t in tensors)
        return sum(t.numel() * t.element_size() for t in tensors)

    client = zero.optimizer
    state = [t for f in flats for t in client.state[f].values() if torch.is_tensor(t) and t.numel() == f.numel()]
    return {
        "numel": sum(p.numel() for p in model.parameters()),
        "master": nbytes(list(flats)),
        "grads": nbytes(grads),
        "staging": nbytes(list(staging)),
        "state": nbytes(state),
    }


def deepspeed_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    from hf_memopt.distributed import deepspeed as ds_adapter

    out: dict[str, Any] = {}
    reference = du.reference_run("group", "mean", "fp32", world_size)
    for stage in (1, 2, 3):
        runs = {}
        for offload in (False, True):
            with du.LogRecords() as logs:
                engine = engine_for(stage, offload)
                train(engine, rank, range(du.STEPS))
            client = engine.optimizer.optimizer
            runs[offload] = {
                "params": full_params(engine),
                "state": client_state(engine),
                "executors": [client.executor_for(i) for i in range(len(client.param_groups))],
                "devices": sorted({p.device.type for p in partitions_of(engine)}),
                "offloaded": ds_adapter.is_offloaded(engine.optimizer),
                "logs": logs,
            }
        out[stage] = {
            "params_equal": same_params(runs[True]["params"], runs[False]["params"]),
            "state_equal": same_state(runs[True]["state"], runs[False]["state"]),
            "state_keys": sorted(runs[True]["state"][0]),
            "diff": du.max_diff(runs[True]["params"], reference),
            "executors": runs[True]["executors"],
            "devices": runs[True]["devices"],
            "offloaded": (runs[False]["offloaded"], runs[True]["offloaded"]),
            "logs": runs[True]["logs"],
        }

    # Checkpoints: saved under offload after SAVE_AT steps; a fresh engine with and without offload loads
    # it and must continue exactly as the uninterrupted run.
    for stage in (2, 3):
        engine = engine_for(stage, offload=True)
        train(engine, rank, range(SAVE_AT))
        engine.save_checkpoint(f"{root}/z{stage}", tag="s")
        train(engine, rank, range(SAVE_AT, du.STEPS))
        expected, expected_state = full_params(engine), client_state(engine)
        for offload in (True, False):
            engine = engine_for(stage, offload, seed=1)
            engine.load_checkpoint(f"{root}/z{stage}", tag="s")
            train(engine, rank, range(SAVE_AT, du.STEPS))
            out[f"ckpt{stage}_{offload}"] = (
                same_params(full_params(engine), expected),
                same_state(client_state(engine), expected_state),
                engine.optimizer.optimizer.executor_for(0),
            )

    # What the engines hold in host RAM, against estimate_memory(offload=True) (one step: the state is lazy).
    for stage in (2, 3):
        out[f"host{stage}"] = measured_host_bytes(stage, rank)

    # What DeepSpeed does without the flag (why the Trainer integration sets it) ...
    try:
        engine_for(2, True, zero_force_ds_cpu_optimizer=True)
        out["no_flag"] = ""
    except ZeRORuntimeException as err:
        out["no_flag"] = str(err)
    # ... and a prepared optimizer that is not ours is an error naming it.
    engine = engine_for(2, offload=False, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    try:
        ds_adapter.require_memopt(engine, "memopt_adamw")
        out["replaced"] = ""
    except RuntimeError as err:
        out["replaced"] = str(err)
    try:
        ds_adapter.bind(engine)
        out["bind_replaced"] = ""
    except TypeError as err:
        out["bind_replaced"] = str(err)
    return out


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return du.run(deepspeed_worker, WORLD, str(tmp_path_factory.mktemp("offload")), timeout=300)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_offload_is_bit_identical_to_no_offload(ds_runs: list[dict[str, Any]], stage: int) -> None:
    for res in ds_runs:
        got = res[stage]
        assert got["offloaded"] == (False, True)
        assert got["devices"] == ["cpu"]
        assert got["params_equal"] and got["state_equal"], got
        assert "memory_0" in got["state_keys"] and "exp_avg" in got["state_keys"]
        assert got["diff"] < 1e-6  # and the unsharded optimizer on the full batch
        assert ran_cpu(got["executors"])  # the C kernel steps the offloaded partitions
        assert any("ZeRO-Offload" in m and "'cpu' executor" in m for m in got["logs"]), got["logs"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [True, False], ids=["to_offload", "to_no_offload"])
def test_zero_offload_checkpoint_round_trip(ds_runs: list[dict[str, Any]], stage: int, offload: bool) -> None:
    for res in ds_runs:
        params_equal, state_equal, ran = res[f"ckpt{stage}_{offload}"]
        assert params_equal and state_equal
        assert ran == "cpu"


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_estimate_memory_offload_counts_the_engine_host_buffers(ds_runs: list[dict[str, Any]], stage: int) -> None:
    """``estimate_memory(offload=True)`` against what DeepSpeed and the optimizer really hold in host RAM."""
    import hf_memopt

    for res in ds_runs:
        got = res[f"host{stage}"]
        est = hf_memopt.estimate_memory(
            got["numel"], topc=du.OPT_KW["topc"], world_size=WORLD, sharded=f"zero{stage}", offload=True
        )
        place = est["placement"]
        assert place["host_buffers"] == {"master": got["master"], "grads": got["grads"], "staging": got["staging"]}
        assert est["memopt"] == got["state"]  # moments, slots and running sum (the 0-dim priorities left out)
        assert place["host_memopt"] == got["master"] + got["grads"] + got["staging"] + got["state"]
        assert place["device_memopt"] == place["device_adamw"]  # offload moves the whole state off the device


@pytest.mark.multiprocess
def test_zero_offload_other_optimizer_is_named(ds_runs: list[dict[str, Any]]) -> None:
    res = ds_runs[0]
    assert "zero_force_ds_cpu_optimizer" in res["no_flag"]  # DeepSpeed's own refusal without the flag
    assert "memopt_adamw was asked for" in res["replaced"] and "torch.optim.adamw.AdamW" in res["replaced"]
    assert "torch.optim.adamw.AdamW" in res["bind_replaced"]


# -- DeepSpeed under Trainer -----------------------------------------------------------------------


def _trainer(out_dir: str, offload: bool, max_steps: int) -> Any:
    from transformers import TrainingArguments

    from hf_memopt.trainer import MemOptTrainer

    zero: dict[str, Any] = {"stage": 2}
    if offload:  # no "zero_force_ds_cpu_optimizer": what a user writes from DeepSpeed's docs
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=out_dir,
        accelerator_config={"use_configured_state": True},
        deepspeed=config,
        optim="memopt_adamw",
        optim_args=f"topc={du.OPT_KW['topc']},decay={du.OPT_KW['decay']}",
        learning_rate=du.OPT_KW["lr"],
        weight_decay=du.OPT_KW["weight_decay"],
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        per_device_train_batch_size=4,
        max_steps=max_steps,
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=du.STEPS,
        report_to="none",
        disable_tqdm=True,
    )
    return MemOptTrainer(model=du.ToyModel(), args=args, train_dataset=du.ToyData(WORLD)), config


def _trainer_params(trainer: Any) -> dict[str, torch.Tensor]:
    return {n.removeprefix("net."): p.detach().clone() for n, p in trainer.model.named_parameters()}


def trainer_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from hf_memopt.integrations.model_card import optimizer_section
    from hf_memopt.trainer import MemOptTrainer

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    out: dict[str, Any] = {}
    with du.LogRecords() as logs:
        trainer, config = _trainer(f"{root}/full", offload=True, max_steps=du.STEPS)
        trainer.train()
    client = trainer.model_wrapped.optimizer.optimizer
    out["client"] = type(client).__name__
    out["executors"] = [client.executor_for(i) for i in range(len(client.param_groups))]
    out["flag"] = trainer.accelerator.deepspeed_config.get("zero_force_ds_cpu_optimizer")
    out["user_config_flag"] = config.get("zero_force_ds_cpu_optimizer", "absent")
    out["logs"] = logs
    out["params"] = _trainer_params(trainer)
    out["card"] = optimizer_section(trainer.args, trainer.optimizer)  # what MemOptTrainer's card gets

    # The same Trainer run without offload: plain DeepSpeed engine here (same data, same hyperparameters).
    engine = engine_for(2, offload=False)
    train(engine, rank, range(du.STEPS))
    out["no_offload_params"] = full_params(engine)

    # Resume from the offloaded checkpoint, with and without offload.
    for offload in (True, False):
        AcceleratorState._reset_state()  # a second Trainer under DeepSpeed needs a fresh accelerator state
        trainer, _ = _trainer(f"{root}/resume_{offload}", offload=offload, max_steps=du.STEPS)
        trainer.train(resume_from_checkpoint=f"{root}/full/checkpoint-{SAVE_AT}")
        out[f"resume_{offload}"] = _trainer_params(trainer)

    # An optimizer other than the one asked for reaches prepare: an error naming it, before any step.
    class OtherOptimizer(MemOptTrainer):
        def create_optimizer(self, model: Any = None) -> Any:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
            return self.optimizer

    AcceleratorState._reset_state()
    trainer, _ = _trainer(f"{root}/other", offload=False, max_steps=1)
    trainer.__class__ = OtherOptimizer
    try:
        trainer.train()
        out["other"] = ""
    except RuntimeError as err:
        out["other"] = str(err)
    return out


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return du.run(trainer_worker, WORLD, str(tmp_path_factory.mktemp("offload_trainer")), timeout=300)


@pytest.mark.multiprocess
def test_trainer_zero_offload_keeps_memopt(trainer_runs: list[dict[str, Any]]) -> None:
    """Without the flag accelerate would train DeepSpeedCPUAdam: the integration sets it, and says so."""
    for res in trainer_runs:
        assert res["client"] == "MemoryAugmentedAdamW"
        assert ran_cpu(res["executors"])
        assert res["flag"] is False
        assert res["user_config_flag"] == "absent"  # the user's dict is not edited
        assert any("zero_force_ds_cpu_optimizer" in m and "memopt_adamw" in m for m in res["logs"]), res["logs"]
        assert same_params(res["params"], res["no_offload_params"])
        assert du.max_diff(res["params"], du.reference_run("group", "mean", "fp32", WORLD)) < 1e-6
    card = trainer_runs[0]["card"]
    assert "### Optimizer: memopt_adamw" in card
    executor_section = card.split("Executor that ran each param group:", 1)[1].split("####", 1)[0]
    assert "cpu" in executor_section and "torch" not in executor_section, executor_section


@pytest.mark.multiprocess
def test_trainer_refuses_a_prepared_optimizer_that_is_not_memopt(trainer_runs: list[dict[str, Any]]) -> None:
    for res in trainer_runs:
        assert "memopt_adamw was asked for" in res["other"], res["other"]
        assert "torch.optim.adamw.AdamW" in res["other"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("offload", [True, False], ids=["to_offload", "to_no_offload"])
def test_trainer_zero_offload_resumes_exactly(trainer_runs: list[dict[str, Any]], offload: bool) -> None:
    for res in trainer_runs:
        assert same_params(res[f"resume_{offload}"], res["params"])


# -- the guard on the arguments (no process group needed) ------------------------------------------


def _offload_args(tmp_path: Any, offload: dict[str, Any], top: dict[str, Any]) -> Any:
    from transformers import TrainingArguments

    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", **offload}},
        **top,
    }
    return TrainingArguments(output_dir=str(tmp_path), deepspeed=config, optim="memopt_adamw", report_to="none")


@pytest.mark.parametrize(
    ("offload", "top", "needle"),
    [
        ({"device": "nvme", "nvme_path": "/tmp"}, {}, "device='nvme'"),
        ({"ratio": 0.5}, {}, "ratio=0.5"),
        ({}, {"zero_force_ds_cpu_optimizer": True}, '"zero_force_ds_cpu_optimizer": false'),
    ],
    ids=["nvme", "partial", "forced_swap"],
)
def test_unsupported_offload_is_refused_with_the_fix(
    tmp_path: Any, offload: dict[str, Any], top: dict[str, Any], needle: str
) -> None:
    import hf_memopt  # noqa: F401  (registers the optim names)

    with pytest.raises(ValueError, match="memopt_adamw") as info:
        _offload_args(tmp_path, offload, top)
    assert needle in str(info.value)


def test_keep_client_optimizer_sets_the_flag_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    from hf_memopt.integrations.deepspeed_guard import keep_client_optimizer

    config: dict[str, Any] = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with caplog.at_level(logging.INFO, logger="hf_memopt.distributed"):
        assert keep_client_optimizer(config, "memopt_adamw") is True
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" in caplog.text and "memopt_adamw" in caplog.text
    plain: dict[str, Any] = {"zero_optimization": {"stage": 2}}
    assert keep_client_optimizer(plain, "memopt_adamw") is False
    assert "zero_force_ds_cpu_optimizer" not in plain  # nothing to keep without offload


# -- FSDP2 with CPUOffloadPolicy ---------------------------------------------------------------------


def _fsdp2(offload: bool, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # pin_memory=False: a CPU-only torch cannot pin ("Cannot access accelerator device when none is available")
    policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
    model = du.make_model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def _fsdp_train(model: torch.nn.Module, opt: Any, rank: int, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        du.loss_fn(model, *du.batch(step, rank)).backward()
        opt.step()


def _fsdp_state(model: torch.nn.Module, opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    state = {
        f"{name}/{k}": v.detach().clone()
        for name, s in full["state"].items()
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    return params, state


def fsdp2_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from hf_memopt import MemoryAugmentedAdamW

    out: dict[str, Any] = {}
    runs = {}
    for offload in (False, True):
        model = _fsdp2(offload)
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        _fsdp_train(model, opt, rank, range(du.STEPS))
        runs[offload] = _fsdp_state(model, opt)
        out[f"executors_{offload}"] = [opt.executor_for(i) for i in range(len(opt.param_groups))]
        out[f"device_{offload}"] = sorted({p.to_local().device.type for p in model.parameters()})
    out["params_equal"] = same_params(runs[True][0], runs[False][0])
    out["state_equal"] = runs[True][1].keys() == runs[False][1].keys() and all(
        torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[True][1]
    )
    out["has_memory"] = any(k.endswith("memory_0") for k in runs[True][1])
    out["diff"] = du.max_diff(runs[True][0], du.reference_run("group", "mean", "fp32", world_size))

    # Full state dicts saved under offload, loaded with and without offload.
    model = _fsdp2(True)
    opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
    _fsdp_train(model, opt, rank, range(SAVE_AT))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    path = f"{root}/fsdp2.pt"  # full state dicts, on rank 0 only (cpu_offload=True), loaded by every rank
    saved = {
        "model": get_model_state_dict(model, options=full),
        "optim": get_optimizer_state_dict(model, opt, options=full),
    }
    if rank == 0:
        torch.save(saved, path)
    torch.distributed.barrier()
    _fsdp_train(model, opt, rank, range(SAVE_AT, du.STEPS))
    expected = _fsdp_state(model, opt)
    for offload in (True, False):
        model = _fsdp2(offload, seed=1)
        opt = MemoryAugmentedAdamW(du.param_groups(model), **du.OPT_KW)
        saved = torch.load(path, weights_only=True)
        set_model_state_dict(model, saved["model"], options=full)
        set_optimizer_state_dict(model, opt, saved["optim"], options=full)
        _fsdp_train(model, opt, rank, range(SAVE_AT, du.STEPS))
        params, state = _fsdp_state(model, opt)
        out[f"ckpt_{offload}"] = (
            same_params(params, expected[0]),
            state.keys() == expected[1].keys() and all(torch.equal(state[k], expected[1][k]) for k in state),
            opt.executor_for(0),
        )
    return out


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return du.run(fsdp2_worker, WORLD, str(tmp_path_factory.mktemp("offload_fsdp2")), timeout=150)


@pytest.mark.multiprocess
def test_fsdp2_cpu_offload_is_bit_identical_to_no_offload(fsdp2_runs: list[dict[str, Any]]) -> None:
    for res in fsdp2_runs:
        assert res["device_True"] == ["cpu"]
        assert res["params_equal"] and res["state_equal"] and res["has_memory"]
        assert res["diff"] < 1e-6
        assert res["executors_True"] == ["cpu", "cpu"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("offload", [True, False], ids=["to_offload", "to_no_offload"])
def test_fsdp2_cpu_offload_checkpoint_round_trip(fsdp2_runs: list[dict[str, Any]], offload: bool) -> None:
    for res in fsdp2_runs:
        params_equal, state_equal, ran = res[f"ckpt_{offload}"]
        assert params_equal and state_equal
        assert ran == "cpu"


def test_estimate_memory_offload_placement_and_refusal() -> None:
    import hf_memopt

    plain = hf_memopt.estimate_memory(10_000, topc=5, world_size=2, sharded="zero2")
    train = plain["breakdown"]
    assert plain["placement"]["device_memopt"] == train["training_memopt"]  # nothing on the host without offload
    assert plain["placement"]["host_memopt"] == 0
    fsdp = hf_memopt.estimate_memory(10_000, topc=5, world_size=2, sharded="fsdp2", offload=True)
    assert fsdp["placement"]["device_memopt"] == 0  # CPUOffloadPolicy keeps the shards themselves on the host
    assert fsdp["placement"]["host_memopt"] == 2 * 5_000 * 4 + fsdp["memopt"]
    with pytest.raises(ValueError, match="offload=True.*'ddp'"):
        hf_memopt.estimate_memory(10_000, world_size=2, sharded="ddp", offload=True)


# -- threads of the C kernel ----------------------------------------------------------------------


def test_kernel_threads_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_memopt.engine.executors import cpu_kernel

    monkeypatch.setenv("HF_MEMOPT_CPU_THREADS", "3")
    assert cpu_kernel.kernel_threads() == 3
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("HF_MEMOPT_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="HF_MEMOPT_CPU_THREADS must be a positive integer or 'auto'"):
            cpu_kernel.kernel_threads()
    # the default: this rank's share of its cores among the node's ranks, at least torch's own threads
    monkeypatch.setenv("HF_MEMOPT_CPU_THREADS", "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # what torchrun's OMP_NUM_THREADS=1 gives
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpu_kernel.kernel_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert cpu_kernel.kernel_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_kernel.kernel_threads() == 16


@pytest.mark.parametrize("reducer", [False, True], ids=["whole_step_kernel", "host_decisions"])
def test_the_kernel_runs_on_the_configured_threads(monkeypatch: pytest.MonkeyPatch, reducer: bool) -> None:
    """Both kernel entry points (the whole-step kernel, and the update after host decisions as under
    ZeRO-Offload's norm reducer) get ``HF_MEMOPT_CPU_THREADS``, not torch's thread count."""
    from hf_memopt import MemoryAugmentedAdamW
    from hf_memopt.engine.executors import cpu_kernel

    seen: list[int] = []
    for name in ("adam_fused", "adam_step"):
        original = getattr(cpu_kernel, name)

        def spy(*args: Any, _original: Any = original) -> Any:
            seen.append(args[-1])
            return _original(*args)

        monkeypatch.setattr(cpu_kernel, name, spy)
    monkeypatch.setenv("HF_MEMOPT_CPU_THREADS", "3")
    model = du.make_model()
    opt = MemoryAugmentedAdamW(model.parameters(), executor="cpu", **du.OPT_KW)
    if reducer:
        opt.norm_reducer = lambda units, local_sq: local_sq  # a one-rank reducer: host decisions
    du.loss_fn(model, *du.batch(0, 0)).backward()
    opt.step()
    assert seen and set(seen) == {3}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_offload_benchmark_self_check_runs(engine: str) -> None:
    """``benchmarks/offload_step.py --self-check``: ZeRO-2 offload or FSDP2 ``CPUOffloadPolicy`` on one gloo
    rank, the checks of the GPU run (the offloaded run equals the run without offload, bit for bit)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "offload_step.py"), "--self-check", "--engine", engine],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "offload_step: OK" in proc.stdout
    assert '"executor": "cpu"' in proc.stdout
    assert f'"engine": "{engine}' in proc.stdout


def test_a_deepspeed_cpu_optimizer_in_our_place_is_named_with_the_flag() -> None:
    """What accelerate's swap leaves behind (a ``deepspeed.ops`` CPU optimizer, stood in for here: building
    DeepSpeedCPUAdam's op takes minutes) is named, with the config key that prevents it."""
    from hf_memopt.distributed.deepspeed import require_memopt

    stand_in = type("DeepSpeedCPUAdam", (), {"__module__": "deepspeed.ops.adam.cpu_adam"})()
    with pytest.raises(RuntimeError) as info:
        require_memopt(stand_in, "memopt_adamw")
    message = str(info.value)
    assert "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam" in message
    assert '"zero_force_ds_cpu_optimizer": false' in message


# -- a user's own accelerator.prepare() under ZeRO-Offload -------------------------------------------

_ACCELERATE_PREPARE = """
import os
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", ACCELERATE_USE_DEEPSPEED="true")
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
import hf_memopt
config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
model = torch.nn.Linear(4, 2)
optimizer = hf_memopt.MemoryAugmentedAdamW(model.parameters(), lr=1e-3)
try:
    accelerator.prepare(model, optimizer)
except ValueError as err:
    print("REFUSED:", err)
else:
    print("PREPARED WITH", type(accelerator._optimizers[0].optimizer).__name__)
"""


@pytest.mark.slow
def test_accelerate_prepare_under_zero_offload_refuses_to_swap_a_memopt_optimizer(tmp_path):
    """Without the Trainer (which sets the flag itself), accelerate's prepare() would replace the optimizer
    by DeepSpeedCPUAdam without a word; it raises instead, before DeepSpeed starts, naming the flag."""
    import subprocess
    import sys

    script = tmp_path / "prepare.py"
    script.write_text(_ACCELERATE_PREPARE)
    env = {**os.environ, "PORT": str(du.free_port())}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED: accelerate would replace MemoryAugmentedAdamW by DeepSpeedCPUAdam" in out.stdout, out.stdout
    assert '"zero_force_ds_cpu_optimizer": false' in out.stdout
