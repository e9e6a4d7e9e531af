"""compiler/records.py: `record` classes behave as `@dataclass(frozen=True)` ones."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import pytest

from lora_lite.compiler import ast, ir
from lora_lite.compiler.diagnostics import Span
from lora_lite.compiler.records import record


def _both():
    """The same class twice: as a record and as a frozen dataclass."""

    def body():
        class Item:
            name: str
            parts: tuple[int, ...]
            span: Span = field(compare=False)
            hidden: str = field(default="h", repr=False)
            kind: str = field(default="k", init=False)
            notes: list[str] = field(default_factory=list, hash=False, compare=False)
            level: int = field(default=0, kw_only=True)

        return Item

    return record(body()), dataclass(frozen=True)(body())


VALUES = [
    ("a", (1, 2), Span(1, 2, 3)),
    ("a", (1, 2), Span(9, 9, 9)),  # differs only in a field that is not compared
    ("a", (1, 3), Span(1, 2, 3)),
    ("b", (), Span(1, 1, 2)),
    ("a", (1, 2), Span(1, 2, 3), "other hidden"),
]


def test_a_record_compares_hashes_and_prints_as_a_frozen_dataclass():
    rec, plain = _both()
    for args in VALUES:
        r, p = rec(*args), plain(*args)
        assert repr(r) == repr(p)
        assert hash(r) == hash(p)
        for other in VALUES:
            assert (r == rec(*other)) == (p == plain(*other))
            assert (r != rec(*other)) == (p != plain(*other))
        assert r != p and r.__eq__(p) is NotImplemented  # another class: never equal
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.name = "changed"
        with pytest.raises(dataclasses.FrozenInstanceError):
            del r.name
        assert dataclasses.replace(r, name="z") == rec("z", *args[1:])
        assert dataclasses.astuple(r) == dataclasses.astuple(p)
    nan = float("nan")  # equal to itself only as the same object, as in a tuple comparison
    assert (rec("a", (nan,), Span(1, 1, 1)) == rec("a", (nan,), Span(1, 1, 1))) == (
        plain("a", (nan,), Span(1, 1, 1)) == plain("a", (nan,), Span(1, 1, 1))
    )


@pytest.mark.parametrize("module", [ast, ir])
def test_every_ast_and_ir_class_is_a_frozen_dataclass(module):
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    records = [c for c in classes if dataclasses.is_dataclass(c)]
    assert len(records) >= 15
    for cls in records:
        assert cls.__dataclass_params__.frozen, cls
        assert cls.__match_args__ == tuple(f.name for f in dataclasses.fields(cls) if f.init), cls


def _signature(cls: type) -> list[tuple[str, inspect._ParameterKind, bool]]:
    """__init__'s arguments: name, kind, whether it has a default."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in parameters]


def test_a_record_is_constructed_as_a_frozen_dataclass_is():
    """The one method compiled per class, __init__: the same arguments, the same attributes set."""
    rec, plain = _both()
    assert _signature(rec) == _signature(plain)
    for args in VALUES:
        assert vars(rec(*args)) == vars(plain(*args))  # `kind` (init=False, a plain default) stays a class attribute
        assert vars(rec(*args, level=3)) == vars(plain(*args, level=3))
    assert rec(*VALUES[0]).notes is not rec(*VALUES[0]).notes  # each gets its own list from the factory
    assert rec(*VALUES[0], notes=["n"]).notes == ["n"]
    for bad_args, bad_kwargs in [(VALUES[0][:1], {}), (VALUES[0], {"kind": "x"}), ((*VALUES[3], "h", ["n"], 3), {})]:
        with pytest.raises(TypeError):
            plain(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError):
            rec(*bad_args, **bad_kwargs)


def test_a_record_refuses_a_field_without_default_after_one_with_as_dataclass_does():
    def body():
        class Bad:
            first: int = 0
            second: int

        return Bad

    with pytest.raises(TypeError, match="non-default argument 'second' follows default argument"):
        dataclass(frozen=True)(body())
    with pytest.raises(TypeError, match="non-default argument 'second' follows default argument"):
        record(body())


@pytest.mark.parametrize("module", [ast, ir])
def test_every_ast_and_ir_class_takes_its_init_fields(module):
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    for cls in [c for c in classes if dataclasses.is_dataclass(c)]:
        expected = [("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, False)]
        for f in dataclasses.fields(cls):
            if f.init:
                kind = inspect.Parameter.KEYWORD_ONLY if f.kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                expected.append((f.name, kind, has_default))
        assert _signature(cls) == expected, cls
