"""Pass: the value of every constant (hypers, constant lets) at the defaults, as the generated Python computes it."""

from __future__ import annotations

import math
from dataclasses import replace

from .diagnostics import Diagnostic
from .ir import Expr, Op, Program

MAX_CONSTANT = 10**100  # folding stops following a value beyond this
MAX_EXPONENT = 1024  # `2 ** 10 ** 10` would never finish, in the compiler or in the generated code


def fold(program: Program) -> Program:
    """`program` with `values` set; arithmetic that fails at the defaults is an E203 diagnostic."""
    values: dict[str, int | float] = {}
    problems: list[Diagnostic] = []
    for name, node in program.constants:
        try:
            folded = evaluate(node, values)
        except (ArithmeticError, ValueError) as exc:
            problems.append(_error(program, node, f"{name} cannot be computed: {exc}"))
            continue
        if isinstance(folded, float) and not math.isfinite(folded):
            problems.append(_error(program, node, f"{name} is {folded} at the defaults"))
        elif folded is not None:
            values[name] = folded
    return replace(program, values=tuple(values.items()), problems=program.problems + tuple(problems))


def _error(program: Program, node: Expr, message: str) -> Diagnostic:
    return Diagnostic(program.file, node.span.line, node.span.col, node.span.end_col, "E203", message)


def evaluate(node: Expr, values: dict[str, int | float]) -> int | float | bool | None:
    """The value of a constant expression given the values of the names it reads.

    None when it depends on something unknown here (d_in, d_out) or grows past MAX_CONSTANT;
    arithmetic that fails (division by zero, overflow, sqrt of a negative) raises, and so does an
    int exponent above MAX_EXPONENT, whatever the base.
    """
    if node.op is Op.NUM:
        return int(node.value) if node.type.kind == "int" else float(node.value)
    if node.op is Op.REF:
        return values.get(node.value)
    args = [evaluate(a, values) for a in node.args]
    if node.op is Op.POW and isinstance(args[1], int) and not isinstance(args[1], bool) and args[1] > MAX_EXPONENT:
        raise OverflowError(f"an int power's exponent is at most {MAX_EXPONENT}, not {args[1]}")
    if any(a is None for a in args):
        return None
    if node.op is Op.NEG:
        result = -args[0]
    elif node.op is Op.CALL:
        if node.value not in _CALLS:
            return None
        result = _CALLS[node.value](*args)
    elif node.op in _BINARY:
        result = _BINARY[node.op](*args)
    else:
        return None
    if isinstance(result, int) and not isinstance(result, bool) and abs(result) > MAX_CONSTANT:
        return None
    return result


_CALLS = {"min": min, "max": max, "abs": abs, "sqrt": math.sqrt, "exp": math.exp, "ceil_div": lambda a, b: -(-a // b)}
_BINARY = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b,
    Op.FLOORDIV: lambda a, b: a // b,
    Op.MOD: lambda a, b: a % b,
    Op.POW: lambda a, b: a**b,
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.LT: lambda a, b: a < b,
    Op.LE: lambda a, b: a <= b,
    Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b,
}
