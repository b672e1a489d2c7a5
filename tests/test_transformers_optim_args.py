"""Strict optim_args: errors name the key and what is allowed, at TrainingArguments
construction (before any model or training step); resolved values are written back.
DeepSpeed configs with their own optimizer are refused."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from test_transformers_fixtures import one_torch_thread, training_args  # noqa: F401 (fixture)
from transformers import Trainer

import hf_memopt
from hf_memopt.integrations.optim_args import MEMOPT_NAMES, resolve_optim_args, split_optim_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("name", "optim_args", "expected"),
    [
        ("memopt_adamw", "tpoc=5", "unknown key 'tpoc' for memopt_adamw. Did you mean 'topc'?"),
        ("memopt_adamw", "momentum=0.9", "unknown key 'momentum' for memopt_adamw"),
        ("memopt_sgd", "amsgrad=true", "unknown key 'amsgrad' for memopt_sgd"),
        ("memopt_adamw", "topc=0", "topc must be an int >= 1 (a Python or numpy integer); got 0"),
        ("memopt_adamw", "topc=2.5", "topc must be an integer; got '2.5'"),
        ("memopt_adamw", "decay=1.5", "decay must be a number with 0 < decay <= 1"),
        ("memopt_adamw", "decay=abc", "decay must be a number; got 'abc'"),
        ("memopt_adamw", "kappa=-1", "kappa must be a finite number >= 0"),
        ("memopt_adamw", "kappa=inf", "kappa must be a finite number"),
        ("memopt_adamw", "aggregation=max", "aggregation must be one of mean, sum, mid; got 'max'"),
        ("memopt_adamw", "key=layer", "key must be one of group, tensor; got 'layer'"),
        ("memopt_adamw", "buffer_dtype=int8", "buffer_dtype must be None, torch.bfloat16"),
        ("memopt_adamw", "amsgrad=maybe", "amsgrad must be true or false; got 'maybe'"),
        ("memopt_adamw", "fused=2", "fused must be true, false or none; got '2'"),
        ("memopt_sgd", "momentum=-0.5", "momentum must be >= 0"),
        ("memopt_rmsprop", "alpha=x", "alpha must be a number; got 'x'"),
        ("memopt_adamw", "lr=0.1", "lr is not accepted for memopt_adamw; set TrainingArguments.learning_rate"),
        ("memopt_adam", "betas=0.9", "set TrainingArguments.adam_beta1 and adam_beta2"),
        ("memopt_adamw", "eps=1e-6", "set TrainingArguments.adam_epsilon"),
        ("memopt_sgd", "weight_decay=0.1", "set TrainingArguments.weight_decay"),
        ("memopt_adamw", "topc", "entry 'topc' is not of the form key=value"),
        ("memopt_adamw", "topc=2,topc=3", "topc is given twice"),
        # Constraints the optimizer class enforces surface at construction too.
        ("memopt_sgd", "nesterov=true", "Nesterov momentum requires a momentum and zero dampening"),
    ],
)
def test_bad_optim_args_fail_at_training_args_construction(tmp_path, name, optim_args, expected):
    with pytest.raises(ValueError) as err:
        training_args(tmp_path, optim=name, optim_args=optim_args)
    assert expected in str(err.value)


def test_unknown_key_lists_every_allowed_key(tmp_path):
    with pytest.raises(ValueError) as err:
        training_args(tmp_path, optim="memopt_rmsprop", optim_args="centred=true")
    message = str(err.value)
    for key in ("topc", "decay", "kappa", "aggregation", "key", "buffer_dtype", "alpha", "eps", "centered"):
        assert f"{key} (" in message
    assert "Did you mean 'centered'?" in message


@pytest.mark.parametrize("name", MEMOPT_NAMES)
def test_resolved_values_are_written_back_and_parse_to_the_same(tmp_path, name):
    args = training_args(tmp_path, optim=name, optim_args=" topc = 3 , buffer_dtype=bfloat16,")
    pairs = split_optim_args(args.optim_args)
    assert pairs["topc"] == "3" and pairs["buffer_dtype"] == "bf16" and pairs["decay"] == "0.7"
    # Critical Momenta has no aggregation argument (its aggregation is fixed, SPEC 1b)
    assert pairs.get("aggregation") == {"memopt_sgd": "sum", "memopt_adamw_cm": None}.get(name, "mean")
    # Every key the optimizer takes is shown, and the string is a fixed point.
    resolved = resolve_optim_args(name, args.optim_args)
    assert set(pairs) == set(resolved.spec.options)
    assert resolved.to_optim_args() == args.optim_args
    # transformers' own parser (used by other handlers and tools) reads it too.
    assert dict(m.split("=") for m in args.optim_args.replace(" ", "").split(",")) == pairs
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["topc"] == 3 and kwargs["buffer_dtype"] is torch.bfloat16


def test_critical_momenta_refuses_aggregation_and_defaults_to_topc_5(tmp_path):
    with pytest.raises(ValueError, match="aggregation is not accepted for memopt_adamw_cm"):
        training_args(tmp_path, optim="memopt_adamw_cm", optim_args="aggregation=mean")
    args = training_args(tmp_path, optim="memopt_adamw_cm", optim_args="kappa=0.5")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_memopt.CriticalMomentaAdamW
    assert kwargs["topc"] == 5 and kwargs["kappa"] == 0.5 and "aggregation" not in kwargs


def test_optim_args_none_resolves_to_defaults(tmp_path):
    args = training_args(tmp_path, optim="memopt_adamw")
    assert args.optim_args == (
        "topc=10,decay=0.7,kappa=1.0,aggregation=mean,key=group,buffer_dtype=None,"
        "amsgrad=False,maximize=False,foreach=None,fused=None,save_memory=True,executor=auto"
    )


def test_other_optimizers_keep_their_optim_args_untouched(tmp_path):
    args = training_args(tmp_path, optim="sgd", optim_args="momentum=0.9")
    assert args.optim_args == "momentum=0.9"


def test_error_at_dispatch_when_args_are_changed_after_construction(tmp_path):
    args = training_args(tmp_path, optim="memopt_adamw")
    args.optim_args = "topc=-3"  # bypasses __post_init__
    with pytest.raises(ValueError, match="topc must be an int >= 1"):
        Trainer.get_optimizer_cls_and_kwargs(args)


DS_WITH_OPTIMIZER = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
}


@pytest.mark.parametrize("form", ["dict", "file", "json", "base64"])
def test_deepspeed_config_with_optimizer_section_is_an_error(tmp_path, form):
    if form == "dict":
        config = DS_WITH_OPTIMIZER
    elif form == "file":
        config = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps(DS_WITH_OPTIMIZER))
    elif form == "json":
        config = json.dumps(DS_WITH_OPTIMIZER)
    else:
        config = base64.urlsafe_b64encode(json.dumps(DS_WITH_OPTIMIZER).encode()).decode()
    # Raised before transformers imports DeepSpeed: works without DeepSpeed installed.
    with pytest.raises(ValueError, match="DeepSpeed config, whose 'optimizer' section \\(type 'AdamW'\\)"):
        training_args(tmp_path, optim="memopt_adamw", deepspeed=config)


def test_deepspeed_config_from_accelerate_launch_environment(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_WITH_OPTIMIZER))
    # What `accelerate launch --use_deepspeed --deepspeed_config_file ds.json` exports.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ValueError, match="'optimizer' section"):
        training_args(tmp_path, optim="memopt_sgd")


def test_deepspeed_config_without_optimizer_section_is_accepted(tmp_path):
    pytest.importorskip("deepspeed", reason="TrainingArguments(deepspeed=...) imports DeepSpeed")
    config = {k: v for k, v in DS_WITH_OPTIMIZER.items() if k != "optimizer"}
    args = training_args(tmp_path, optim="memopt_adamw", deepspeed=config)
    assert args.to_dict()["optim"] == "memopt_adamw"


def test_set_optimizer_after_deepspeed_config_is_checked_too(tmp_path):
    args = training_args(tmp_path)
    args.deepspeed = DS_WITH_OPTIMIZER  # as if given at construction with another optim
    with pytest.raises(ValueError, match="'optimizer' section"):
        args.set_optimizer(name="memopt_adamw")


@pytest.mark.parametrize("name", MEMOPT_NAMES)
def test_save_memory_is_parsed_strictly_and_shown(tmp_path, name):
    assert resolve_optim_args(name, None).values()["save_memory"] is True
    resolved = resolve_optim_args(name, "save_memory=false,topc=2")
    assert resolved.values()["save_memory"] is False and resolved.constructor_kwargs()["save_memory"] is False
    assert "save_memory=False" in resolved.to_optim_args()
    assert resolve_optim_args(name, "save_memory=true").constructor_kwargs()["save_memory"] is True
    with pytest.raises(ValueError, match="save_memory must be true or false; got 'maybe'"):
        resolve_optim_args(name, "save_memory=maybe")


def test_save_memory_false_reaches_the_optimizer_and_its_checkpoints(tmp_path):
    args = training_args(tmp_path, optim="memopt_adamw", optim_args="topc=2,save_memory=false")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["save_memory"] is False
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = cls([p], **kwargs)
    p.grad = torch.ones(4)
    optimizer.step()
    saved = optimizer.state_dict()["state"][0]
    assert "exp_avg" in saved and not any(key.startswith("memory_") for key in saved)


@pytest.mark.parametrize("name", MEMOPT_NAMES)
def test_executor_is_an_optim_arg_that_reaches_the_optimizer(tmp_path, name):
    """``--optim_args executor=torch``: the CLI's way to pick the implementation (e.g. away from the GPU engine)."""
    assert resolve_optim_args(name, None).values()["executor"] == "auto"
    args = training_args(tmp_path, optim=name, optim_args="topc=2,executor=torch")
    assert "executor=torch" in args.optim_args
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert kwargs["executor"] == "torch"
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = cls([p], **kwargs)
    p.grad = torch.ones(4)
    optimizer.step()
    assert optimizer.executor_for(0) == "torch"
    with pytest.raises(ValueError, match="executor must be one of auto, torch, cpu, triton; got 'gpu'"):
        resolve_optim_args(name, "executor=gpu")
