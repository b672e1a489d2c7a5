"""The optim names are registered with transformers: TrainingArguments, HfArgumentParser,
set_optimizer, serialisation, pickling into a fresh process, accelerate launch."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from test_transformers_fixtures import REPO_ROOT, one_torch_thread, run_python, training_args  # noqa: F401 (fixture)
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_memopt
from hf_memopt.integrations import transformers as integration
from hf_memopt.integrations.optim_args import MEMOPT_NAMES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = {
    "memopt_adamw": hf_memopt.MemoryAugmentedAdamW,
    "memopt_adam": hf_memopt.MemoryAugmentedAdam,
    "memopt_sgd": hf_memopt.MemoryAugmentedSGD,
    "memopt_rmsprop": hf_memopt.MemoryAugmentedRMSprop,
    "memopt_adamw_cm": hf_memopt.CriticalMomentaAdamW,
}


def test_names_are_enum_members_exactly_once_after_repeated_register():
    integration.register()
    integration.register()
    for name in MEMOPT_NAMES:
        member = OptimizerNames(name)
        assert member.value == name and member.name == name.upper()
        assert [m.value for m in OptimizerNames].count(name) == 1
    # The static method is wrapped once: its __wrapped__ is transformers' own function.
    wrapper = inspect.getattr_static(Trainer, "get_optimizer_cls_and_kwargs").__func__
    assert getattr(wrapper, integration._MARK, False)
    assert not getattr(wrapper.__wrapped__, integration._MARK, False)
    assert "def get_optimizer_cls_and_kwargs" in inspect.getsource(wrapper.__wrapped__)


@pytest.mark.parametrize("name", MEMOPT_NAMES)
def test_dispatch_builds_our_class_with_training_args_hyperparameters(tmp_path, name):
    args = training_args(tmp_path, optim=name, learning_rate=3e-3, adam_beta1=0.8, adam_epsilon=1e-7)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is CLASSES[name]
    assert kwargs["lr"] == 3e-3
    if name in ("memopt_adamw", "memopt_adam", "memopt_adamw_cm"):
        assert kwargs["betas"] == (0.8, 0.999) and kwargs["eps"] == 1e-7
    else:
        assert "betas" not in kwargs
    assert kwargs["topc"] == (5 if name == "memopt_adamw_cm" else 10) and kwargs["decay"] == 0.7
    # Critical Momenta has no aggregation argument (SPEC 1b)
    assert kwargs.get("aggregation") == {"memopt_sgd": "sum", "memopt_adamw_cm": None}.get(name, "mean")
    # Everything the Trainer passes is accepted by the class.
    cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_other_names_still_reach_transformers(tmp_path):
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_torch"))
    assert cls is torch.optim.AdamW and "topc" not in kwargs
    cls, _ = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="sgd"))
    assert cls is torch.optim.SGD


def test_private_handler_table_when_present(tmp_path):
    trainer_optimizer = integration._trainer_optimizer_module()
    if trainer_optimizer is None:
        pytest.skip("transformers < 5.2 has no transformers.trainer_optimizer")
    args = training_args(tmp_path, optim="memopt_rmsprop", optim_args="topc=3,alpha=0.9")
    handler = trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.MEMOPT_RMSPROP]
    ctx = trainer_optimizer.OptimizerContext(
        args=args, model=None, optimizer_kwargs={"lr": args.learning_rate}, adam_kwargs={}, optim_args={}
    )
    cls, kwargs = handler(ctx)
    assert cls is hf_memopt.MemoryAugmentedRMSprop and kwargs["topc"] == 3 and kwargs["alpha"] == 0.9


def test_training_args_to_dict_json_and_pickle(tmp_path):
    args = training_args(tmp_path, optim="memopt_adamw", optim_args="topc=5,decay=0.9,buffer_dtype=bf16")
    assert args.optim is OptimizerNames.MEMOPT_ADAMW
    assert args.to_dict()["optim"] == "memopt_adamw"
    assert json.loads(args.to_json_string())["optim"] == "memopt_adamw"
    assert json.loads(args.to_json_string())["optim_args"].startswith("topc=5,decay=0.9,")
    again = pickle.loads(pickle.dumps(args))
    assert again.optim is OptimizerNames.MEMOPT_ADAMW and again.optim_args == args.optim_args


def test_set_optimizer(tmp_path):
    args = training_args(tmp_path)
    args.set_optimizer(name="memopt_sgd", learning_rate=0.05, args="momentum=0.9,nesterov=true,topc=4")
    assert args.optim is OptimizerNames.MEMOPT_SGD and args.learning_rate == 0.05
    assert args.to_dict()["optim"] == "memopt_sgd"
    assert "momentum=0.9," in args.optim_args and "nesterov=True" in args.optim_args
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_memopt.MemoryAugmentedSGD
    assert (kwargs["momentum"], kwargs["nesterov"], kwargs["topc"]) == (0.9, True, 4)
    with pytest.raises(ValueError, match="tpoc"):
        args.set_optimizer(name="memopt_adamw", args="tpoc=3")


def test_hf_argument_parser_cli(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    optim_action = next(a for a in parser._actions if "--optim" in a.option_strings)
    assert set(MEMOPT_NAMES) <= set(optim_action.choices)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--optim", "memopt_adam"]
        + ["--optim_args", "topc=5,decay=0.9,amsgrad=true"]
    )
    assert args.optim is OptimizerNames.MEMOPT_ADAM
    assert args.optim_args.startswith("topc=5,decay=0.9,") and "amsgrad=True" in args.optim_args
    with pytest.raises(ValueError, match="unknown key 'topk'"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--use_cpu", "true", "--optim", "memopt_adam", "--optim_args", "topk=5"]
        )


def test_compatibility_error_names_the_transformers_version(monkeypatch):
    import transformers

    integration.check_transformers_internals()  # the installed version passes
    # Simulate a transformers whose Trainer no longer has the static method we wrap.
    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", lambda self, args, model=None: None)
    with pytest.raises(integration.TransformersCompatibilityError) as err:
        integration.check_transformers_internals()
    message = str(err.value)
    assert transformers.__version__ in message and integration.SUPPORTED_TRANSFORMERS in message
    assert "get_optimizer_cls_and_kwargs" in message


TRAIN_SCRIPT = """
import sys
tests_dir = sys.argv.pop(1)
import hf_memopt  # all a user script does: the import registers the names ...
from transformers import HfArgumentParser, Trainer, TrainingArguments
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()  # ... before the parser exists
sys.path.insert(0, tests_dir)
from test_transformers_fixtures import ClassificationData, tiny_bert
trainer = Trainer(model=tiny_bert(), args=args, train_dataset=ClassificationData())
trainer.train()
print("OPTIMIZER", type(trainer.optimizer.optimizer).__name__)
"""

LOAD_SCRIPT = """
import sys, torch
path = sys.argv[1]
assert "hf_memopt" not in sys.modules
args = torch.load(path, weights_only=False)  # as Trainer/users load training_args.bin
assert "hf_memopt" in sys.modules  # the pickle re-imported it
from transformers.training_args import OptimizerNames
assert args.optim is OptimizerNames.MEMOPT_ADAMW
print(args.optim.value, args.optim_args)
"""


@pytest.mark.slow
def test_accelerate_launch_cli_and_training_args_bin_in_fresh_process(tmp_path):
    """`import hf_memopt` registers (the script does nothing else), `--optim memopt_adamw`
    works under `accelerate launch`, and the checkpoint's training_args.bin loads in a
    process that never imported hf_memopt."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not on PATH")
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    out_dir = tmp_path / "out"
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(script), str(REPO_ROOT / "tests"), "--output_dir", str(out_dir), "--use_cpu", "true"]
    cmd += ["--optim", "memopt_adamw", "--optim_args", "topc=2,decay=0.9", "--max_steps", "2", "--save_steps", "2"]
    cmd += ["--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OPTIMIZER MemoryAugmentedAdamW" in proc.stdout

    bin_path = out_dir / "checkpoint-2" / "training_args.bin"
    # A fresh interpreter that has never imported hf_memopt; it only needs to find the
    # package, as it would an installed one.
    out = run_python(LOAD_SCRIPT, str(bin_path))
    name, optim_args = out.split()
    assert name == "memopt_adamw" and optim_args.startswith("topc=2,decay=0.9,")
