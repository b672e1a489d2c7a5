"""Add members to an existing ``Enum`` class at run time.

transformers 5.x has no registry for optimizer names: ``TrainingArguments.optim`` is
validated with ``OptimizerNames(value)`` and ``HfArgumentParser`` lists the enum's members
as the ``--optim`` choices. Extending that enum is therefore the only way a plain
``TrainingArguments(optim="memopt_adamw")`` is accepted. The standard library offers no
API for it, so this module writes the same private tables ``EnumType`` fills when it
creates a class (``_member_map_``, ``_value2member_map_``, ``_member_names_``), which
have the same meaning on CPython 3.10 to 3.13, and then checks that every public way of
looking a member up finds the new one.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

_REQUIRED_TABLES = ("_member_map_", "_value2member_map_", "_member_names_")


class EnumExtensionError(RuntimeError):
    """The enum class does not have the layout :func:`extend_enum` relies on."""


def check_extensible(enum_cls: type) -> None:
    """Raise :class:`EnumExtensionError` if ``enum_cls`` cannot be extended safely."""
    if not (isinstance(enum_cls, type) and issubclass(enum_cls, Enum)):
        raise EnumExtensionError(f"{enum_cls!r} is not an Enum class")
    for table in _REQUIRED_TABLES:
        if table not in vars(enum_cls) and not hasattr(enum_cls, table):
            raise EnumExtensionError(f"{enum_cls.__name__} has no {table}")
    if not isinstance(enum_cls._member_names_, list):
        raise EnumExtensionError(f"{enum_cls.__name__}._member_names_ is not a list")


def extend_enum(
    enum_cls: type[Enum],
    name: str,
    value: Any,
    reduce_ex: Callable[[int], Any] | None = None,
) -> Enum:
    """Add the member ``name = value`` to ``enum_cls`` and return it.

    Idempotent: if ``value`` already names a member, that member is returned unchanged
    (with ``reduce_ex`` attached when given). ``reduce_ex`` replaces the member's
    ``__reduce_ex__`` so pickles of it can name a loader that first re-creates the
    member in a fresh process (the enum's own reduce, ``EnumCls(value)``, fails there).
    """
    check_extensible(enum_cls)
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        if reduce_ex is not None:
            existing.__reduce_ex__ = reduce_ex
        return existing
    if name in enum_cls._member_map_:
        raise EnumExtensionError(f"{enum_cls.__name__}.{name} already exists with another value")

    # The mixin type (``str`` for transformers' ExplicitEnum) builds the member, exactly
    # as EnumType does for members declared in the class body.
    member_type = getattr(enum_cls, "_member_type_", object)
    member = object.__new__(enum_cls) if member_type is object else member_type.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    if reduce_ex is not None:
        member.__reduce_ex__ = reduce_ex

    # Class attribute first: EnumType.__setattr__ refuses names already in _member_map_.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    hashable_values = getattr(enum_cls, "_hashable_values_", None)  # CPython >= 3.13
    if isinstance(hashable_values, list):
        hashable_values.append(value)

    verify_member(enum_cls, member)
    return member


def verify_member(enum_cls: type[Enum], member: Enum) -> None:
    """Check that every lookup path used by transformers and argparse finds ``member``."""
    name, value = member._name_, member._value_
    problems = []
    if enum_cls(value) is not member:
        problems.append(f"{enum_cls.__name__}({value!r})")
    if enum_cls[name] is not member:
        problems.append(f"{enum_cls.__name__}[{name!r}]")
    if getattr(enum_cls, name, None) is not member:
        problems.append(f"{enum_cls.__name__}.{name}")
    if member not in list(enum_cls):
        problems.append(f"iteration over {enum_cls.__name__}")
    if member.value != value or member.name != name:
        problems.append(".value/.name")
    if problems:
        raise EnumExtensionError(f"member {name}={value!r} added but not found by: {', '.join(problems)}")
