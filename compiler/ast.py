"""AST of a spec: small frozen dataclasses, each carrying its source span."""

from __future__ import annotations

from .diagnostics import Span
from .records import record


@record
class Num:
    """A number literal, as written (leading zeros of an int dropped)."""

    text: str
    span: Span

    @property
    def is_int(self) -> bool:
        return self.text.isdigit()


@record
class Name:
    """A name: a hyper, param, let, stat, or one of d_in, d_out, x, y, W, bias."""

    id: str
    span: Span


@record
class Call:
    """A builtin applied to its arguments: `svd(W, r)`."""

    fn: str
    args: tuple[Expr, ...]
    span: Span


@record
class BinOp:
    """A binary operator or comparison: `a @ b`, `r > 1`."""

    op: str  # + - * / // % @ ** and comparisons
    left: Expr
    right: Expr
    span: Span


@record
class Neg:
    """`-operand`."""

    operand: Expr
    span: Span


@record
class Transpose:
    """`operand.T`."""

    operand: Expr
    span: Span


@record
class Cond:
    """`then if test else other`: a per-layer choice between two forms, on a comparison of dims."""

    then: Expr
    test: Expr
    other: Expr
    span: Span


Expr = Num | Name | Call | BinOp | Neg | Transpose | Cond


@record
class Hyper:
    """`hyper NAME: TYPE = DEFAULT`."""

    name: str
    type: str
    default: Expr
    span: Span


@record
class Param:
    """`param NAME[DIMS] = INIT`, or `frozen NAME[DIMS] = INIT` (trainable False: a tensor fixed at init);
    `shared ...` of either (shared True: one tensor for every target of an attach)."""

    name: str
    dims: tuple[Expr, ...]
    init: Expr
    span: Span
    trainable: bool = True
    shared: bool = False


@record
class Let:
    """`let NAME, ... = VALUE`."""

    names: tuple[str, ...]
    value: Expr
    span: Span


@record
class Stat:
    """`stat NAME = STATISTIC(x)`."""

    name: str
    value: Expr
    span: Span


@record
class Require:
    """`require COND: "MESSAGE"`."""

    cond: Expr
    message: str
    span: Span


@record
class Residual:
    """`residual VALUE`: the weight the layer keeps."""

    value: Expr
    span: Span


@record
class Target:
    """`target "REGEX"`: the default target layers."""

    pattern: str
    span: Span


@record
class Forward:
    """`output VALUE` or `input VALUE`: the hook's math."""

    site: str  # "input" or "output"
    value: Expr
    span: Span


Statement = Hyper | Param | Let | Stat | Require | Residual | Target | Forward


@record
class Spec:
    """A parsed spec: its header, docstring and statements in order."""

    name: str
    title: str
    url: str | None
    doc: str
    statements: tuple[Statement, ...]
    span: Span
