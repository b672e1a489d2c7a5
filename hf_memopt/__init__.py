"""hf_memopt: memory-augmented (critical-gradient) optimizers for PyTorch and 🤗 Transformers.

McRae, Parthasarathi, Assran, Chandar, "Memory Augmented Optimizers for Deep Learning",
ICLR 2022, arXiv:2106.10708. Critical Momenta (``CriticalMomentaAdamW``): Malviya et al., "Promoting
Exploration in Memory-Augmented Adam using Critical Momenta", TMLR 2024, arXiv:2307.09638.
"""

from .config import MemoryConfig
from .engine.checkpoint import without_memory
from .estimate import estimate_memory
from .optim import (
    CriticalMomentaAdamW,
    MemoryAugmentedAdam,
    MemoryAugmentedAdamW,
    MemoryAugmentedOptimizer,
    MemoryAugmentedRMSprop,
    MemoryAugmentedSGD,
)

__version__ = "0.1.0"

__all__ = [
    "CriticalMomentaAdamW",
    "MemoryAugmentedAdam",
    "MemoryAugmentedAdamW",
    "MemoryAugmentedOptimizer",
    "MemoryAugmentedRMSprop",
    "MemoryAugmentedSGD",
    "MemoryConfig",
    "__version__",
    "estimate_memory",
    "without_memory",
]

# Last, once the optimizers exist: register optim="memopt_*" with transformers when (and if)
# transformers loads its training arguments -- an import hook, so a pure-PyTorch user never
# imports transformers (HF_MEMOPT_SKIP_TRANSFORMERS=1 skips it; see hf_memopt.integrations).
from .integrations import install_transformers_hook as _install_transformers_hook  # noqa: E402

_install_transformers_hook()

#: Names resolved on first access (PEP 562), so that ``import hf_memopt`` does not import
#: transformers: ``from hf_memopt import MemOptTrainer`` imports it then.
from ._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(__name__, {"MemOptTrainer": "trainer"})
