"""Types of spec expressions and the typed IR the checker hands to the emitter."""

from __future__ import annotations

from dataclasses import dataclass, field

from .diagnostics import Span
from .dims import Dim

# Stages, in order: a value is computed at the latest stage any of its inputs needs.
CONST = 0  # Python scalars from hypers and layer sizes
INIT = 1  # tensors computed once at attach: from W (original), statistics, other init values
FORWARD = 2  # tensors computed in the hook: from params, x, y, bias

STAGE_NAMES = {CONST: "constant", INIT: "init-time", FORWARD: "forward-time"}


@dataclass(frozen=True)
class Type:
    """`kind` is int/float/bool for Python scalars, tensor, or tuple (what svd returns).

    A tensor's `shape` uses the math convention (vectors are columns). A `token`
    tensor has one value per token: at run time it carries the batch dims in front.
    """

    kind: str
    shape: tuple[Dim, ...] = ()
    token: bool = False
    diag: bool = False
    items: tuple[Type, ...] = ()
    operator: str = ""  # a matrix applied by a builtin, never built: "householder"

    @property
    def is_scalar(self) -> bool:
        return self.kind in ("int", "float", "bool") or (self.kind == "tensor" and not self.shape)

    @property
    def is_python(self) -> bool:
        return self.kind in ("int", "float", "bool")

    @property
    def is_matrix(self) -> bool:
        return self.kind == "tensor" and len(self.shape) == 2

    def __str__(self) -> str:
        if self.kind == "tuple":
            return "(" + ", ".join(str(t) for t in self.items) + ")"
        if self.is_python:
            return self.kind
        dims = ", ".join(str(d) for d in self.shape)
        prefix = "per-token " if self.token else ""
        if self.operator:
            return f"{self.operator}[{dims}]"
        return f"{prefix}[{dims}]" if not self.diag else f"diag[{self.shape[0]}]"


INT = Type("int")
FLOAT = Type("float")
BOOL = Type("bool")
ERROR = Type("error")


def tensor(*shape: Dim, token: bool = False) -> Type:
    return Type("tensor", tuple(shape), token=token)


@dataclass(eq=False)
class Node:
    """A typed expression. `op` is num, ref, call, neg, T (transpose) or a binary operator.

    For `ref`, `value` is the name and `ref_kind` what it names (hyper, dim, input,
    param, let, buffer); for `call` it is the builtin; for `num` the literal text.
    """

    op: str
    args: list[Node]
    type: Type
    stage: int
    span: Span
    value: str = ""
    ref_kind: str = ""


@dataclass
class HyperInfo:
    name: str
    type: str
    default: Node
    line: int


@dataclass
class LetInfo:
    names: tuple[str, ...]
    value: Node
    types: tuple[Type, ...]
    stage: int
    line: int


@dataclass
class ParamInfo:
    name: str
    shape: tuple[Dim, ...]
    init: Node  # a fill call (zeros, ones, kaiming) or an init-time expression
    line: int


@dataclass
class BufferInfo:
    """A frozen tensor the forward or the residual reads: computed at init, saved with the adapter."""

    name: str
    shape: tuple[Dim, ...]
    line: int
    value: Node | None = None  # set for values the compiler hoisted out of the forward


@dataclass
class Program:
    """A checked spec: everything the emitter needs, in statement order."""

    name: str
    title: str
    url: str | None
    doc: str
    source: str
    file: str
    hypers: list[HyperInfo] = field(default_factory=list)
    lets: list[LetInfo] = field(default_factory=list)
    params: list[ParamInfo] = field(default_factory=list)
    buffers: list[BufferInfo] = field(default_factory=list)
    stats: list[tuple[str, str, int]] = field(default_factory=list)  # name, statistic, line
    requires: list[tuple[Node, str, int]] = field(default_factory=list)
    residual: Node | None = None
    residual_line: int = 0
    site: str = "output"
    forward: Node | None = None
    forward_line: int = 0
    target: str | None = None
    forward_reads_weight: bool = False
    init_reads_weight: bool = False

    @property
    def quantizable(self) -> bool:
        return not self.forward_reads_weight and self.residual is None

    @property
    def trainable_count(self) -> Dim:
        total = Dim.const(0)
        for param in self.params:
            size = Dim.const(1)
            for dim in param.shape:
                size = size * dim
            total = total + size
        return total
