"""Types of spec expressions and the stages at which values are computed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .dims import Dim


class Stage(IntEnum):
    """When a value is computed: at the latest stage any of its inputs needs."""

    CONST = 0  # Python scalars from hypers and layer sizes
    INIT = 1  # tensors computed once at attach: from W (original), statistics, other init values
    FORWARD = 2  # tensors computed in the hook: from params, x, y, bias


CONST, INIT, FORWARD = Stage.CONST, Stage.INIT, Stage.FORWARD
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
    integer: bool = False  # an index set (int64, from an index fill such as randperm): only scatter and sparse read it

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
        if self.integer:
            return f"index set [{dims}]"
        return f"{prefix}[{dims}]" if not self.diag else f"diag[{self.shape[0]}]"


INT = Type("int")
FLOAT = Type("float")
BOOL = Type("bool")
ERROR = Type("error")


def tensor(*shape: Dim, token: bool = False) -> Type:
    return Type("tensor", tuple(shape), token=token)
