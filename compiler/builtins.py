"""The builtin functions of the spec language: each one's type rule and doc, in one table.

docs/language.md is generated from DOCS below, so every builtin is documented once.
"""

from __future__ import annotations

from .dims import Dim
from .types import CONST, FLOAT, INIT, Type, tensor

# Fills: only valid as the whole init of a param; the param's declared shape is the shape.
FILLS = {
    "zeros": "all zeros",
    "ones": "all ones",
    "kaiming": "kaiming-uniform with a=sqrt(5), fan_in = last dim (as nn.Linear and PEFT's lora_A)",
}

ELEMENTWISE = {"sqrt", "exp", "elu", "abs"}

DOCS = {
    **{name: f"`param P[...] = {name}`: {text}." for name, text in FILLS.items()},
    "svd": "`let U, S, Vt = svd(M, k)`: top-k singular triplets of a matrix, in float32 "
    "(U [m, k], S [k], Vt [k, n]); init-time only; needs k <= min(m, n).",
    "diag": "`diag(v)`: the diagonal matrix of v; inside `@` chains it becomes a broadcast multiply.",
    "rownorm": "`rownorm(M)`: the L2 norm of each row of M, a vector [m].",
    "colnorm": "`colnorm(M)`: the L2 norm of each column of M, a vector [n].",
    "sqrt": "`sqrt(e)`: elementwise square root.",
    "exp": "`exp(e)`: elementwise exponential.",
    "elu": "`elu(e)`: elementwise ELU (alpha 1): e if e > 0 else exp(e) - 1.",
    "abs": "`abs(e)`: elementwise absolute value.",
    "detach": "`detach(e)`: the same value, with no gradient flowing through it.",
    "min": "`min(a, b)`: the smaller of two constants.",
    "max": "`max(a, b)`: the larger of two constants.",
}

ARITY = {"svd": 2, "diag": 1, "rownorm": 1, "colnorm": 1, "detach": 1, "min": 2, "max": 2}
ARITY.update({name: 1 for name in ELEMENTWISE})
ARITY.update({name: 0 for name in FILLS})

NAMES = frozenset(ARITY)


def result_type(fn: str, args: list[Type], stages: list[int]) -> Type | str:
    """The type of fn(args), or a message saying what is wrong with the arguments."""
    if fn in ("min", "max"):
        if not all(a.is_python and a.kind != "bool" for a in args) or max(stages) > CONST:
            return f"{fn}() takes two constants (hypers, numbers, d_in, d_out)"
        return FLOAT if "float" in (a.kind for a in args) else args[0]
    if fn in ELEMENTWISE:
        (arg,) = args
        if arg.kind == "tuple" or arg.diag:
            return f"{fn}() takes a scalar or a tensor, not {arg}"
        if fn == "elu" and arg.is_python:
            return "elu() takes a tensor, not a constant"
        return FLOAT if arg.is_python else Type("tensor", arg.shape, token=arg.token)
    if fn == "detach":
        (arg,) = args
        return arg if arg.kind == "tensor" and not arg.diag else f"detach() takes a tensor, not {arg}"
    if fn in ("rownorm", "colnorm"):
        (arg,) = args
        if not arg.is_matrix or arg.token or arg.diag:
            return f"{fn}() takes a matrix, not {arg}"
        return tensor(arg.shape[0] if fn == "rownorm" else arg.shape[1])
    if fn == "diag":
        (arg,) = args
        if arg.kind != "tensor" or len(arg.shape) != 1 or arg.token:
            return f"diag() takes a vector, not {arg}"
        return Type("tensor", (arg.shape[0], arg.shape[0]), diag=True)
    if fn == "svd":
        matrix, k = args
        if not matrix.is_matrix or matrix.token or matrix.diag:
            return f"svd() takes a matrix first, not {matrix}"
        if k.kind != "int" or stages[1] > CONST:
            return f"svd() takes an int constant rank second, not {k}"
        if stages[0] > INIT:
            return "svd() runs once at init: its matrix cannot depend on params, x or y"
        return Type("tuple", items=(tensor(matrix.shape[0], _RANK), tensor(_RANK), tensor(_RANK, matrix.shape[1])))
    raise AssertionError(fn)


# Placeholder for the rank dim of svd; the checker substitutes the real k.
_RANK = Dim.of("__rank__")


def substitute_rank(t: Type, rank: Dim) -> Type:
    shape = tuple(rank if d == _RANK else d for d in t.shape)
    return Type(t.kind, shape, token=t.token)
