"""The rule every cached address rests on: the same objects, on the same memory, of the same size.

An executor that keeps raw addresses between steps may reuse them only while what it read is still there:
each state entry the same object (``is``), each tensor's data pointer and byte size unchanged (a ``.data``
swap keeps the object but not its storage; an in-place narrowing keeps the pointer but not the size). The
rule has two implementations with the same results: C++ against torch's headers (:mod:`.native_guard`,
a few nanoseconds per tensor, where it is built) and :class:`PythonChecker`. :func:`checker` picks one.
Used by the steady-step snapshot (:mod:`.snapshot`) and the ledgers' bindings (:class:`.state.Binding`).
"""

from __future__ import annotations

from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import native_guard

_PLAIN = (Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_nbytes, _layout = attrgetter("nbytes"), attrgetter("layout")
_shape, _dtype, _device = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")


def checker() -> Any:
    """The C++ checker when it is built (:func:`.native_guard.load`), else :class:`PythonChecker`."""
    return native_guard.load() or PythonChecker


def plain(value: Any) -> bool:
    """A tensor whose data pointer and size the checkers read: exactly ``torch.Tensor`` or ``Parameter``
    (subclasses may dispatch their own ``data_ptr``)."""
    return type(value) in _PLAIN_SET


def pointers(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The data pointers and byte sizes of ``values`` as the checkers compare them (-1: not a plain tensor)."""
    ptrs = np.array([v.data_ptr() if plain(v) else -1 for v in values], dtype=np.int64)
    nbytes = np.array([v.nbytes if plain(v) else -1 for v in values], dtype=np.int64)
    return ptrs, nbytes


class PythonChecker:
    """The rule in Python; :mod:`.native_guard` implements it in C++ with the same results."""

    @staticmethod
    def grads(
        params: list[Tensor], param_ptrs: np.ndarray, param_nbytes: np.ndarray, ptrs: np.ndarray
    ) -> list[Tensor] | None:
        """Every parameter's gradient, when each parameter still has its data pointer and byte size and each
        gradient is a plain dense contiguous tensor of its parameter's shape, dtype and device (their data
        pointers into ``ptrs``); else None."""
        grads = [p.grad for p in params]
        n = len(params)
        if not all(map(is_not, grads, repeat(None))) or not set(map(type, grads)) <= _PLAIN_SET:
            return None
        if not np.array_equal(np.fromiter(map(Tensor.data_ptr, params), np.int64, n), param_ptrs):
            return None
        if not np.array_equal(np.fromiter(map(_nbytes, params), np.int64, n), param_nbytes):
            return None
        if set(map(_layout, grads)) != {torch.strided} or not all(map(Tensor.is_contiguous, grads)):
            return None
        for attr in (_shape, _dtype, _device):
            if list(map(attr, grads)) != list(map(attr, params)):
                return None
        ptrs[:] = np.fromiter(map(Tensor.data_ptr, grads), np.int64, n)
        return grads

    @staticmethod
    def same_state(
        dicts: list[dict[str, Any]], keys: tuple[str, ...], expected: list[Any], ptrs: np.ndarray, nbytes: np.ndarray
    ) -> bool:
        """Whether ``dicts[i][keys[j]] is expected[k]`` (``k = i * len(keys) + j``) for every i, j, and each of
        those that is a plain tensor still has the data pointer ``ptrs[k]`` and the byte size ``nbytes[k]``."""
        get = itemgetter(*keys) if len(keys) > 1 else (lambda d: (d[keys[0]],))
        try:
            found = list(chain.from_iterable(map(get, dicts)))
        except KeyError:
            return False
        if len(found) != len(expected) or not all(map(is_, found, expected)):
            return False
        return _same_memory(found, ptrs, nbytes)

    @staticmethod
    def same_entries(
        dicts: list[dict[Any, Any]],
        sizes: np.ndarray,
        keys: list[Any],
        expected: list[Any],
        ptrs: np.ndarray,
        nbytes: np.ndarray,
    ) -> bool:
        """Whether each ``dicts[i]`` holds exactly ``sizes[i]`` entries and, in order, its entries are
        ``(keys[k], expected[k])`` (the same key and value objects; ``k`` runs over all entries of all dicts),
        and each value that is a plain tensor still has the data pointer ``ptrs[k]`` and the byte size
        ``nbytes[k]``."""
        if not np.array_equal(np.fromiter(map(len, dicts), np.int64, len(dicts)), sizes):
            return False
        found_keys = list(chain.from_iterable(map(dict.keys, dicts)))
        found = list(chain.from_iterable(map(dict.values, dicts)))
        if len(found) != len(expected) or len(found_keys) != len(keys):
            return False
        if not all(map(is_, found_keys, keys)) or not all(map(is_, found, expected)):
            return False
        return _same_memory(found, ptrs, nbytes)


def _same_memory(found: list[Any], ptrs: np.ndarray, nbytes: np.ndarray) -> bool:
    """Each plain tensor of ``found`` (``ptrs`` -1 marks the others) with its recorded data pointer and size."""
    tensors = ptrs != -1
    found = list(compress(found, tensors))
    return np.array_equal(np.fromiter(map(Tensor.data_ptr, found), np.int64, len(found)), ptrs[tensors]) and (
        np.array_equal(np.fromiter(map(_nbytes, found), np.int64, len(found)), nbytes[tensors])
    )


__all__ = ["PythonChecker", "checker", "plain", "pointers"]
