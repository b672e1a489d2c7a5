"""hf_memopt: memory-augmented (critical-gradient) optimizers for PyTorch and 🤗 Transformers.

McRae, Parthasarathi, Assran, Chandar, "Memory Augmented Optimizers for Deep Learning",
ICLR 2022, arXiv:2106.10708.
"""

from .config import MemoryConfig
from .estimate import estimate_memory
from .optim import (
    MemoryAugmentedAdam,
    MemoryAugmentedAdamW,
    MemoryAugmentedOptimizer,
    MemoryAugmentedRMSprop,
    MemoryAugmentedSGD,
)

__version__ = "0.1.0"

__all__ = [
    "MemoryAugmentedAdam",
    "MemoryAugmentedAdamW",
    "MemoryAugmentedOptimizer",
    "MemoryAugmentedRMSprop",
    "MemoryAugmentedSGD",
    "MemoryConfig",
    "__version__",
    "estimate_memory",
]

# Last, once the optimizers exist: register optim="memopt_*" with transformers if it is
# installed (HF_MEMOPT_SKIP_TRANSFORMERS=1 skips it). Importable without transformers.
from .integrations import register_transformers_if_available as _register_transformers  # noqa: E402

_register_transformers()
