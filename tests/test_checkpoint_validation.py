"""Checkpoints are checked before anything is loaded (SPEC section 3; issue 20 item 2, issue 22 items 4 and 6).

A bad memory value, a memory of another kind (gradients vs momenta) or of another size is a ``ValueError``
naming the parameter or group and the key, and the optimizer is left exactly as it was: it then steps as a
twin that never saw the checkpoint. Other memory settings load as torch loads every hyperparameter, with
a warning naming each.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from streams import clone_params, gradient_stream, make_params, set_grads

import hf_memopt


def run(opt, params, grads):
    for g in grads:
        set_grads(params, g)
        opt.step()


def checkpoint(cls=hf_memopt.MemoryAugmentedAdamW, **kwargs):
    params = make_params()
    opt = cls(params, lr=1e-2, topc=3, **kwargs)
    run(opt, params, list(gradient_stream(5, skip_every=0)))
    return copy.deepcopy(opt.state_dict())


CORRUPTIONS = {
    "count-too-large": ("memory_count", lambda s: s.update(memory_count=torch.tensor(7)), r"\[0, topc=3\]"),
    "count-negative": ("memory_count", lambda s: s.update(memory_count=torch.tensor(-1)), r"\[0, topc=3\]"),
    "count-fractional": ("memory_count", lambda s: s.update(memory_count=torch.tensor(1.5)), "integers"),
    "sum-shape": ("memory_sum", lambda s: s.update(memory_sum=torch.zeros(3)), "shape"),
    "slot-shape": ("memory_1", lambda s: s.update(memory_1=s["memory_1"].reshape(-1)), "shape"),
    "slot-dtype": ("memory_0", lambda s: s.update(memory_0=s["memory_0"].to(torch.int32)), "dtype"),
    "slot-missing": ("memory_2", lambda s: s.pop("memory_2"), "missing"),
    "sum-missing": ("memory_sum", lambda s: s.pop("memory_sum"), "missing"),
    "priority-nan": ("priority_1", lambda s: s.update(priority_1=torch.tensor(float("nan"))), "finite"),
    "priority-inf": ("priority_0", lambda s: s.update(priority_0=torch.tensor(float("inf"))), "finite"),
    "priority-negative": ("priority_2", lambda s: s.update(priority_2=torch.tensor(-1.0)), ">= 0"),
    "priority-units": ("priority_0", lambda s: s.update(priority_0=torch.zeros(2)), "one per memory_count"),
    "clock-negative": ("memory_clock", lambda s: s.update(memory_clock=torch.tensor(-3)), ">= 0"),
    "extra-slot": ("memory_3", lambda s: s.update(memory_3=torch.zeros_like(s["memory_0"])), "beyond topc=3"),
}


@pytest.mark.parametrize("executor", ["torch", "auto"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_memory_value_is_refused_and_changes_nothing(case, executor):
    key, corrupt, why = CORRUPTIONS[case]
    saved = checkpoint()
    corrupt(saved["state"][2])  # parameter 2, shape (3, 4, 2)

    grads = list(gradient_stream(8, seed=5))
    params = make_params(seed=3)
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=3, executor=executor)
    run(opt, params, grads[:3])
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    with pytest.raises(ValueError, match=rf"memory of parameter 2 .*{key} .*{why}"):
        opt.load_state_dict(saved)

    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    run(opt, params, grads[3:])
    run(twin, twin_params, grads[3:])
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for k, v in twin.state[q].items():
            assert torch.equal(opt.state[p][k], v), k


def test_a_valid_checkpoint_still_loads_and_continues():
    """The checks accept what the optimizers write: a round trip continues bit for bit."""
    grads = list(gradient_stream(10))
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=3, key="tensor", buffer_dtype="bf16")
    run(opt, params, grads[:5])
    resumed = clone_params(params)
    opt2 = hf_memopt.MemoryAugmentedAdamW(resumed, lr=1e-2, topc=3, key="tensor", buffer_dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, params, grads[5:])
    run(opt2, resumed, grads[5:])
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


# -- item 4: a memory of gradients is not a memory of momenta -------------------------------------


@pytest.mark.parametrize(
    ("writer", "reader", "match"),
    [
        (hf_memopt.MemoryAugmentedAdamW, hf_memopt.CriticalMomentaAdamW, "holds gradients.*holds momenta"),
        (hf_memopt.CriticalMomentaAdamW, hf_memopt.MemoryAugmentedAdamW, "holds momenta.*holds gradients"),
    ],
)
def test_cross_loading_gradient_and_momentum_memories_is_refused(writer, reader, match):
    saved = checkpoint(writer)
    params = make_params()
    opt = reader(params, lr=1e-2, topc=3)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert len(opt.state) == 0 and "aggregation" in opt.param_groups[0]
    # the way out the message names: the base optimizer's state, an empty memory of the reader's own kind
    with pytest.warns(UserWarning, match="no critical-gradient memory"):
        opt.load_state_dict(hf_memopt.without_memory(saved))
    expected = "sum" if reader is hf_memopt.CriticalMomentaAdamW else "mean"
    assert opt.param_groups[0]["aggregation"] == expected


def test_critical_momenta_refuses_a_gradient_memory_checkpoint_without_the_marker():
    """Checkpoints written before the marker (or rebuilt by a sharded checkpointer) are told by their settings."""
    saved = checkpoint(hf_memopt.MemoryAugmentedAdamW)
    del saved[hf_memopt.engine.checkpoint.MEMORY_HOLDS]
    opt = hf_memopt.CriticalMomentaAdamW(make_params(), lr=1e-2, topc=3)
    with pytest.raises(ValueError, match="aggregation='mean'.*holds momenta"):
        opt.load_state_dict(saved)
    assert len(opt.state) == 0


# -- item 6: resume with other memory settings --------------------------------------------------


def test_other_memory_settings_load_as_torch_loads_hyperparameters_with_a_warning():
    saved = checkpoint(decay=0.8, kappa=1.0, buffer_dtype="bf16")
    params = make_params()
    opt = hf_memopt.MemoryAugmentedAdamW(params, lr=1e-2, topc=3, decay=0.9, kappa=2.0, buffer_dtype="bf16")
    with pytest.warns(UserWarning) as record:
        opt.load_state_dict(saved)
    message = " ".join(str(w.message) for w in record)
    assert "decay=0.8 (this optimizer: 0.9)" in message and "kappa=1.0 (this optimizer: 2.0)" in message
    assert "buffer_dtype" not in message and "aggregation" not in message  # only what differs
    # what runs is what the checkpoint said, as torch.optim keeps a checkpoint's lr
    assert (opt.param_groups[0]["decay"], opt.param_groups[0]["kappa"]) == (0.8, 1.0)


def test_a_checkpoint_with_an_invalid_setting_is_refused():
    saved = checkpoint()
    saved["param_groups"][0]["decay"] = 3.0
    opt = hf_memopt.MemoryAugmentedAdamW(make_params(), lr=1e-2, topc=3)
    with pytest.raises(ValueError, match="checkpoint's param group 0: decay must be"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["decay"] == 0.7 and len(opt.state) == 0


def test_the_model_card_shows_the_resumed_value_that_ran_next_to_optim_args(tmp_path):
    """Resumed with other ``--optim_args``, the card states what ran and what optim_args said (the Trainer's own
    hyperparameter list repeats optim_args), so it no longer contradicts itself silently."""
    from transformers import TrainingArguments

    from hf_memopt.integrations.model_card import hyperparameters

    args = TrainingArguments(
        output_dir=str(tmp_path), optim="memopt_adamw", optim_args="topc=3,decay=0.9", report_to=[]
    )
    opt = hf_memopt.MemoryAugmentedAdamW(make_params(), lr=1e-2, topc=3, decay=0.9)
    assert hyperparameters(args, opt)["decay"] == "0.9"
    with pytest.warns(UserWarning, match=r"decay=0.8 \(this optimizer: 0.9\)"):
        opt.load_state_dict(checkpoint(decay=0.8))
    rows = hyperparameters(args, opt)
    assert rows["decay"].startswith("0.8 (ran; `optim_args` said 0.9")
    assert rows["topc"] == "3"
