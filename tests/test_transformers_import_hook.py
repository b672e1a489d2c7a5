"""``import hf_memopt`` does not import transformers; the optim names are registered when
transformers loads its training arguments (an import hook), or at once if it already has;
a transformers whose internals moved is a warning naming its version, never an import error.

Each case runs in a fresh interpreter: what matters is the import order. The import *time*
is a benchmark (README "Install"), not a timed test; here only what gets imported is checked.
"""

from __future__ import annotations

import pytest
from test_transformers_fixtures import run_python

FRESH_IMPORT = """
import sys, warnings
warnings.simplefilter("error", RuntimeWarning)
import hf_memopt
from hf_memopt.integrations import _hook, hook_pending

heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "datasets", "accelerate", "trl"))
assert not heavy, heavy
assert _hook in sys.meta_path and hook_pending() == ("transformers.trainer", "transformers.training_args")

# What transformers' own import of its training arguments triggers: the names exist.
from transformers.training_args import OptimizerNames
assert OptimizerNames("memopt_adamw") is OptimizerNames.MEMOPT_ADAMW
assert "transformers.trainer" not in sys.modules and hook_pending() == ("transformers.trainer",)
from transformers import HfArgumentParser, TrainingArguments
parser = HfArgumentParser(TrainingArguments)
optim = next(a for a in parser._actions if "--optim" in a.option_strings)
assert {"memopt_adamw", "memopt_sgd"} <= set(optim.choices)
optim_args = next(a for a in parser._actions if "--optim_args" in a.option_strings)
assert "topc" in optim_args.help and "buffer_dtype" in optim_args.help and "momentum" in optim_args.help
args = TrainingArguments(output_dir=sys.argv[1], optim="memopt_adamw", optim_args="topc=3", report_to="none")
assert args.optim_args.startswith("topc=3,")

# The lazy attribute imports the trainer, whose hook adds the dispatch and removes itself.
from hf_memopt import MemOptTrainer
from transformers import Trainer
assert issubclass(MemOptTrainer, Trainer) and "MemOptTrainer" in dir(hf_memopt)
assert _hook not in sys.meta_path and hook_pending() == ()
cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
assert cls is hf_memopt.MemoryAugmentedAdamW and kwargs["topc"] == 3
print("OK")
"""


def test_import_does_not_load_transformers_and_the_hook_registers_later(tmp_path):
    assert run_python(FRESH_IMPORT, str(tmp_path)).strip() == "OK"


TRANSFORMERS_FIRST = """
import sys, warnings
warnings.simplefilter("error", RuntimeWarning)
from transformers import Trainer, TrainingArguments
import hf_memopt
from hf_memopt.integrations import _hook, hook_pending
assert _hook not in sys.meta_path and hook_pending() == ()
args = TrainingArguments(output_dir=sys.argv[1], optim="memopt_sgd", optim_args="momentum=0.9", report_to="none")
assert Trainer.get_optimizer_cls_and_kwargs(args)[0] is hf_memopt.MemoryAugmentedSGD
print("OK")
"""


def test_transformers_imported_first_registers_at_once(tmp_path):
    assert run_python(TRANSFORMERS_FIRST, str(tmp_path)).strip() == "OK"


# A transformers whose OptimizerNames can no longer be extended, simulated by making our
# layout check look for a table no enum has: the same path as a real change.
BROKEN_VIA_HOOK = """
import sys, warnings
import hf_memopt
import hf_memopt.integrations.enum_ext as enum_ext
enum_ext._REQUIRED_TABLES = ("_member_map_", "_table_transformers_no_longer_has_")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from transformers import Trainer, TrainingArguments  # must not raise
    import transformers
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "hf_memopt" in str(w.message)]
assert len(messages) == 1, messages  # once, not once per hooked module
assert transformers.__version__ in messages[0] and "OptimizerNames" in messages[0], messages[0]
from hf_memopt.integrations import _hook
assert _hook not in sys.meta_path
try:
    TrainingArguments(output_dir=sys.argv[1], optim="memopt_adamw", report_to="none")
except ValueError:
    pass
else:
    raise AssertionError("memopt_adamw accepted although registration failed")
# The optimizers themselves are untouched.
import torch
p = torch.nn.Parameter(torch.ones(3))
opt = hf_memopt.MemoryAugmentedAdamW([p], lr=0.1, topc=2)
p.grad = torch.ones(3)
opt.step()
assert (p < 1).all()
print("OK")
"""


def test_broken_internal_is_a_warning_naming_the_version_not_an_error(tmp_path):
    assert run_python(BROKEN_VIA_HOOK, str(tmp_path)).strip() == "OK"


BROKEN_ALREADY_IMPORTED = """
import sys, warnings
import transformers
from transformers import TrainingArguments
del TrainingArguments.set_optimizer  # a transformers that moved it
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import hf_memopt  # must not raise
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and transformers.__version__ in messages[0], messages
assert "TrainingArguments.set_optimizer" in messages[0], messages[0]
assert hf_memopt.MemoryAugmentedSGD is not None
print("OK")
"""


def test_broken_internal_when_transformers_was_imported_first(tmp_path):
    assert run_python(BROKEN_ALREADY_IMPORTED, str(tmp_path)).strip() == "OK"


SKIPPED = """
import sys
import hf_memopt
from hf_memopt.integrations import _hook, hook_pending
assert _hook not in sys.meta_path and hook_pending() == ()
from transformers.training_args import OptimizerNames
try:
    OptimizerNames("memopt_adamw")
except ValueError:
    print("OK")
"""


def test_skip_environment_variable_installs_no_hook():
    assert run_python(SKIPPED, env={"HF_MEMOPT_SKIP_TRANSFORMERS": "1"}).strip() == "OK"


TRL_CONFIG = """
import sys
import hf_memopt
from trl import SFTConfig  # imports transformers' training args after hf_memopt: the hook registers
config = SFTConfig(output_dir=sys.argv[1], optim="memopt_adamw", optim_args="topc=4", report_to="none", bf16=False)
assert config.optim_args.startswith("topc=4,")
print("OK")
"""


def test_trl_config_accepts_the_name_after_the_hook(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed")
    assert run_python(TRL_CONFIG, str(tmp_path), timeout=240).strip() == "OK"
