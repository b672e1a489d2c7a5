"""The memory-augmented optimizers: one memory engine, four base updates."""

from .adam import MemoryAugmentedAdam, MemoryAugmentedAdamW
from .base import MemoryAugmentedOptimizer
from .rmsprop import MemoryAugmentedRMSprop
from .sgd import MemoryAugmentedSGD

__all__ = [
    "MemoryAugmentedAdam",
    "MemoryAugmentedAdamW",
    "MemoryAugmentedOptimizer",
    "MemoryAugmentedRMSprop",
    "MemoryAugmentedSGD",
]
