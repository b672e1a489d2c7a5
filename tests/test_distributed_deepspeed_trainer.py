"""Trainer and MemOptTrainer with a DeepSpeed ZeRO config bind the partitions by themselves (issue 4).

No ``bind()`` call anywhere: each of 2 gloo ranks (CPU, ``DS_ACCELERATOR=cpu``) trains through
``Trainer(optim="memopt_adamw")`` (ZeRO-2) or ``MemOptTrainer`` (ZeRO-3) on du's toy problem, and
the result is held to the unsharded optimizer on the full batch (``reference_state`` below):

* the parameters after ``du.STEPS`` steps equal it within 1e-6;
* every rank's flat partition holds one memory unit per model-tensor segment it holds (computed
  here from the tensor shapes and DeepSpeed's partitioning rule), whose priorities, stored
  gradients and running sum are the unsharded optimizer's for those tensors, laid out as
  DeepSpeed lays out the parameters.

``key="tensor"``: unbound partitions (one unit each) give other parameters on this data, while
with ``key="group"`` they happen to coincide, so only the unit layout would catch them.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import dist_utils as du
import pytest
import torch

pytestmark = pytest.mark.multiprocess
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks its accelerator then
deepspeed = pytest.importorskip("deepspeed")

KEY = "tensor"
OPTIM_ARGS = f"topc={du.OPT_KW['topc']},decay={du.OPT_KW['decay']},key={KEY}"
TOPC = du.OPT_KW["topc"]
WORLD = 2
#: the model's tensors, in the order of du.param_groups (= the Trainer's decay / no-decay groups)
GROUPS = [["0.weight", "2.weight", "4.weight"], ["0.bias", "2.bias", "4.bias"]]
MEMORY_KEYS = [f"memory_{k}" for k in range(TOPC)] + ["memory_sum"]


def trainer_worker(rank: int, world_size: int, stage: int, trainer_name: str, out_dir: str) -> dict[str, Any]:
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    from hf_memopt.trainer import MemOptTrainer

    # Without a GPU, TrainingArguments(deepspeed=...) gives accelerate no backend and it counts ONE
    # process on each rank (unsharded data, every rank "main") while DeepSpeed partitions over two.
    # The documented way out: configure the state first (gloo) and have TrainingArguments reuse it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # max_grad_norm=0.0 below: the reference does not clip
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=out_dir,
        accelerator_config={"use_configured_state": True},
        deepspeed=config,
        optim="memopt_adamw",
        optim_args=OPTIM_ARGS,
        learning_rate=du.OPT_KW["lr"],
        weight_decay=du.OPT_KW["weight_decay"],
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        per_device_train_batch_size=4,
        max_steps=du.STEPS,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=du.STEPS,
        report_to="none",
        disable_tqdm=True,
    )
    trainer_cls = {"Trainer": Trainer, "MemOptTrainer": MemOptTrainer}[trainer_name]
    model = du.ToyModel()
    trainer = trainer_cls(model=model, args=args, train_dataset=du.ToyData(WORLD))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()

    zero = trainer.model_wrapped.optimizer  # the engine's ZeRO optimizer; ours is its client
    names = {id(p): n.removeprefix("net.") for n, p in model.named_parameters()}
    if stage == 3:
        flats, lp_groups = zero.fp32_partitioned_groups_flat, zero.fp16_groups
    else:
        flats, lp_groups = zero.single_partition_of_fp32_groups, zero.bit16_groups
    partitions = []
    for flat, lps in zip(flats, lp_groups):
        state = zero.optimizer.state[flat]
        partitions.append(
            {
                "names": [names[id(p)] for p in lps],
                "numel": flat.numel(),
                "priorities": torch.stack([state[f"priority_{k}"].reshape(-1) for k in range(TOPC)], dim=1),
                **{key: state[key].detach().clone() for key in MEMORY_KEYS},
            }
        )
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        full = {names[id(p)]: p.detach().clone() for p in params}
    return {
        "world_size": trainer.args.world_size,
        "process_index": trainer.args.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "client": type(zero.optimizer).__name__,
        "warnings": [str(w.message) for w in caught if "hf_memopt" in str(w.message)],
        "params": full,
        "partitions": partitions,
    }


@functools.cache
def reference_state() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """du.reference_run's unsharded run, also returning its per-tensor memory (by parameter name)."""
    from hf_memopt import MemoryAugmentedAdamW

    model = du.make_model()
    opt = MemoryAugmentedAdamW(du.param_groups(model), key=KEY, **du.OPT_KW)
    for step in range(du.STEPS):
        grads = None
        for r in range(WORLD):
            model.zero_grad()
            du.loss_fn(model, *du.batch(step, r)).backward()
            local = [p.grad.clone() for p in model.parameters()]
            grads = local if grads is None else [a + b for a, b in zip(grads, local)]
        for p, g in zip(model.parameters(), grads):
            p.grad = g / WORLD
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        state[n] = {key: st[key].reshape(-1) for key in MEMORY_KEYS}
        state[n]["priorities"] = torch.stack([st[f"priority_{k}"].reshape(-1) for k in range(TOPC)], dim=1)
    return params, state


def expected_partition(stage: int, rank: int, numel: int, tensors: dict[str, torch.Tensor]) -> tuple[list[str], Any]:
    """Which tensors rank ``rank``'s partition of a group holds, and how it slices a per-tensor layout.

    ZeRO-1/2 flattens the group's tensors in order, pads the whole to ``world * numel`` and gives
    rank r elements ``[r * numel, (r + 1) * numel)``. ZeRO-3 splits every tensor into ``world``
    pieces of ``ceil(n / world)`` (the last padded) and concatenates this rank's pieces.
    """
    if stage == 3:
        held, pieces = [], []
        for name, t in tensors.items():
            per = math.ceil(t.numel() / WORLD)
            if min(per, t.numel() - rank * per) > 0:
                held.append(name)
            pieces.append((name, per))

        def layout(per_tensor: dict[str, torch.Tensor]) -> torch.Tensor:
            out = []
            for name, per in pieces:
                flat = torch.nn.functional.pad(
                    per_tensor[name].reshape(-1).float(), (0, per * WORLD - tensors[name].numel())
                )
                out.append(flat[rank * per : (rank + 1) * per])
            return torch.cat(out)

        return held, layout

    lo, hi = rank * numel, (rank + 1) * numel
    held, offset = [], 0
    for name, t in tensors.items():
        if offset < hi and offset + t.numel() > lo:
            held.append(name)
        offset += t.numel()

    def layout(per_tensor: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([per_tensor[name].reshape(-1).float() for name in tensors])
        return torch.nn.functional.pad(flat, (0, WORLD * numel - flat.numel()))[lo:hi]

    return held, layout


CASES = [(2, "Trainer"), (3, "MemOptTrainer")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"zero{c[0]}-{c[1]}")
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    stage, trainer_name = request.param
    out_dir = str(tmp_path_factory.mktemp(f"zero{stage}"))
    return stage, du.run(trainer_worker, WORLD, stage, trainer_name, out_dir, timeout=150)


def test_trainer_runs_deepspeed_on_both_ranks(trained: tuple[int, list[dict]]) -> None:
    _stage, results = trained
    assert [(r["process_index"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    assert all(r["distributed_type"] == "DistributedType.DEEPSPEED" for r in results)
    assert all(r["client"] == "MemoryAugmentedAdamW" for r in results)
    assert not [w for r in results for w in r["warnings"]], "bound partitions: no 'not bound' warning"


def test_trainer_deepspeed_matches_unsharded(trained: tuple[int, list[dict]]) -> None:
    _stage, results = trained
    ref_params, _ = reference_state()
    for res in results:
        assert du.max_diff(res["params"], ref_params) < 1e-6


def test_trainer_deepspeed_memory_units_are_the_tensor_segments(trained: tuple[int, list[dict]]) -> None:
    stage, results = trained
    ref_params, ref_state = reference_state()
    units_seen = []
    for rank, res in enumerate(results):
        assert [part["names"] for part in res["partitions"]] == GROUPS
        for part in res["partitions"]:
            tensors = {name: ref_params[name] for name in part["names"]}
            held, layout = expected_partition(stage, rank, part["numel"], tensors)
            units_seen.append(len(held))
            expected = torch.cat([ref_state[name]["priorities"] for name in held])
            assert part["priorities"].shape == expected.shape, (rank, part["names"], held)
            torch.testing.assert_close(part["priorities"], expected, rtol=1e-6, atol=1e-7)
            for key in MEMORY_KEYS:
                want = layout({name: ref_state[name][key] for name in part["names"]})
                torch.testing.assert_close(part[key].float(), want, rtol=1e-6, atol=1e-7, msg=f"{rank} {key}")
    # the layout is not trivial: some partition holds several tensors, some tensor straddles ranks
    assert max(units_seen) > 1
