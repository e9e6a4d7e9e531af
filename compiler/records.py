"""`record`: `@dataclass(frozen=True)` whose methods cost one compile per class instead of six.

They behave as the dataclass's own (the same text, the same fields compared and hashed, `NotImplemented`
for another class, `FrozenInstanceError` on assignment, `replace`, `fields`, `match`: tests/test_records.py).
Before Python 3.13 `dataclass` compiles each method it generates from its own source text when the class is
made, six for a frozen class: creating the ~40 classes of the AST and IR was the largest fixed cost of a cold
`lora-lite compile --check`. Here `__repr__`, `__eq__`, `__hash__`, `__setattr__` and `__delattr__` are shared
by every class, and `__init__`, which must name the fields, is the one method compiled per class.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, FrozenInstanceError, dataclass, fields
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


def _setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


_FACTORY = object()  # the default of an __init__ argument whose field has a default_factory: "call it"


def _init(cls: type, all_fields: tuple[Field, ...]) -> None:
    """Give `cls` the `__init__` a frozen dataclass's would be: the init fields as arguments in order (keyword-only
    ones after `*`), each set with `object.__setattr__`, defaults and factories as `field()` says (an init=False
    field with a plain default is left to the class attribute, as dataclass leaves it). No InitVar fields."""
    names = {"setattr": object.__setattr__, "FACTORY": _FACTORY}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    seen_default = False
    for f in all_fields:
        if f.default_factory is not MISSING:
            names[f"factory_{f.name}"] = f.default_factory
            argument = f"{f.name}=FACTORY"
            value = f"factory_{f.name}() if {f.name} is FACTORY else {f.name}" if f.init else f"factory_{f.name}()"
        elif f.init:
            argument, value = f.name, f.name
            if f.default is not MISSING:
                names[f"default_{f.name}"] = f.default
                argument = f"{f.name}=default_{f.name}"
        else:
            continue
        if f.init and f.kw_only:
            keyword.append(argument)
        elif f.init:
            if "=" not in argument and seen_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
            seen_default = seen_default or "=" in argument
            positional.append(argument)
        body.append(f"    setattr(self, {f.name!r}, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    arguments = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    exec(f"def __init__({arguments}):\n" + ("\n".join(body) or "    pass"), names)
    init = names["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init


def record(cls: T) -> T:
    """`cls` as a frozen dataclass (fields, `field()` options, `replace`, `match` as usual)."""
    cls.__repr__, cls.__eq__, cls.__hash__ = _repr, _eq, _hash
    cls.__setattr__, cls.__delattr__ = _setattr, _delattr
    cls = dataclass(init=False, repr=False, eq=False)(cls)  # fields and __match_args__; compiles nothing
    _init(cls, fields(cls))
    cls.__dataclass_params__.init = cls.__dataclass_params__.frozen = True  # what it is: frozen, with an __init__
    return cls
