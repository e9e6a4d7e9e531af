"""AST of a spec: small frozen dataclasses, each carrying its source span."""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import Span


@dataclass(frozen=True)
class Num:
    text: str
    span: Span

    @property
    def is_int(self) -> bool:
        return self.text.isdigit()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % @ ** and comparisons
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Transpose:
    operand: Expr
    span: Span


Expr = Num | Name | Call | BinOp | Neg | Transpose


@dataclass(frozen=True)
class Hyper:
    name: str
    type: str
    default: Expr
    span: Span


@dataclass(frozen=True)
class Param:
    name: str
    dims: tuple[Expr, ...]
    init: Expr
    span: Span


@dataclass(frozen=True)
class Let:
    names: tuple[str, ...]
    value: Expr
    span: Span


@dataclass(frozen=True)
class Stat:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Require:
    cond: Expr
    message: str
    span: Span


@dataclass(frozen=True)
class Residual:
    value: Expr
    span: Span


@dataclass(frozen=True)
class Target:
    pattern: str
    span: Span


@dataclass(frozen=True)
class Forward:
    site: str  # "input" or "output"
    value: Expr
    span: Span


Statement = Hyper | Param | Let | Stat | Require | Residual | Target | Forward


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    url: str | None
    doc: str
    statements: tuple[Statement, ...]
    span: Span
