"""The memory-augmented optimizers: one memory engine, five base updates (Critical Momenta among them)."""

from .adam import MemoryAugmentedAdam, MemoryAugmentedAdamW
from .base import MemoryAugmentedOptimizer
from .critical_momenta import CriticalMomentaAdamW
from .rmsprop import MemoryAugmentedRMSprop
from .sgd import MemoryAugmentedSGD

__all__ = [
    "CriticalMomentaAdamW",
    "MemoryAugmentedAdam",
    "MemoryAugmentedAdamW",
    "MemoryAugmentedOptimizer",
    "MemoryAugmentedRMSprop",
    "MemoryAugmentedSGD",
]
