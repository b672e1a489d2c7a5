"""hf_memopt: memory-augmented (critical-gradient) optimizers for PyTorch and 🤗 Transformers.

McRae, Parthasarathi, Assran, Chandar, "Memory Augmented Optimizers for Deep Learning",
ICLR 2022, arXiv:2106.10708.
"""

from .config import MemoryConfig
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
]
