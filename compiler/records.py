"""`record`: `@dataclass(frozen=True)` with one shared `__repr__`, `__eq__` and `__hash__` for every class.

They behave as the dataclass's own (the same text, the same fields compared and hashed, `NotImplemented`
for another class: tests/test_records.py), but are not generated per class. Before Python 3.13 `dataclass`
compiles each method it generates from source text when the class is made, six for a frozen class: creating
the ~40 classes of the AST and IR was the largest fixed cost of a cold `lora-lite compile --check`, and three
shared methods take a third off it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T", bound=type)

_COMPARED: dict[type, tuple[str, ...]] = {}  # class -> the fields its __eq__ and __hash__ read


def _key(obj: object) -> tuple:
    names = _COMPARED.get(type(obj))
    if names is None:
        names = _COMPARED[type(obj)] = tuple(f.name for f in fields(obj) if f.compare)
    return tuple([getattr(obj, name) for name in names])


def _repr(self: object) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _eq(self: object, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _key(self) == _key(other)


def _hash(self: object) -> int:
    return hash(_key(self))


def record(cls: T) -> T:
    """`cls` as a frozen dataclass (fields, `field()` options, `replace`, `match` as usual)."""
    cls.__repr__, cls.__eq__, cls.__hash__ = _repr, _eq, _hash
    return dataclass(frozen=True, repr=False, eq=False)(cls)
