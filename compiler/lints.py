"""Pass: the checks of a well-typed spec that is still wrong.

E401/E402 a name nothing reads; E403 a param that never reaches the forward; E303 a residual whose
removed term the forward does not add back; E304 a require that fails for the default hypers.
"""

from __future__ import annotations

from dataclasses import replace

from .diagnostics import Diagnostic, Span
from .fold import evaluate
from .ir import Expr, Op, Program, RefKind, refs, walk
from .types import CONST, ERROR


def lint(program: Program) -> Program:
    """`program` with the lint diagnostics added; without a forward rule only the requires are checked."""
    found = _requires(program)
    if program.forward is None:  # reported by typecheck: nothing to lint against
        return replace(program, problems=program.problems + tuple(found))
    found += [*_unused(program), *_params_reach_forward(program)]
    if program.residual is not None and program.residual.type is not ERROR:
        found += _residual_is_added_back(program)
    return replace(program, problems=program.problems + tuple(found))


def _error(program: Program, span: Span, code: str, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(program.file, span.line, span.col, span.end_col, code, message, hint)


def _requires(program: Program) -> list[Diagnostic]:
    """A require that reads no layer size is decided by the defaults: it must hold for them."""
    values = dict(program.values)
    found = []
    for require in program.requires:
        cond = require.cond
        if cond.type.kind != "bool" or cond.stage > CONST:
            continue  # reported by typecheck
        try:
            holds = evaluate(cond, values)
        except (ArithmeticError, ValueError) as exc:
            found.append(_error(program, cond.span, "E304", f"this require cannot be evaluated at the defaults: {exc}"))
            continue
        if holds is False:
            names = sorted({n.value for n in walk([cond]) if n.op is Op.REF and n.value in values})
            given = ", ".join(f"{n} = {values[n]}" for n in names)
            found.append(
                _error(
                    program,
                    cond.span,
                    "E304",
                    f"this require fails for the default hypers{f' ({given})' if given else ''}: {require.message}",
                    "change the defaults so that every require holds",
                )
            )
    return found


def _unused(program: Program) -> list[Diagnostic]:
    found = []
    for d in program.declared:
        if d.used or d.kind is RefKind.HYPER or d.broken:
            continue
        what = d.kind.value if d.kind in (RefKind.PARAM, RefKind.FROZEN, RefKind.STAT) else "let"
        code = "E401" if d.kind in (RefKind.PARAM, RefKind.FROZEN) else "E402"
        found.append(_error(program, d.span, code, f"{what} {d.name} is never used"))
    return found


def reach(program: Program, roots: list[Expr], through_inits: bool) -> set[str]:
    """Every name the roots read, through lets (and param inits when `through_inits`)."""
    values = {n: let.value for let in program.lets for n in let.names if n != "_"}
    if through_inits:
        values.update({p.name: p.init for p in program.params})
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.op is Op.REF and node.value not in seen:
            seen.add(node.value)
            if node.value in values:
                stack.append(values[node.value])
        stack.extend(node.args)
    return seen


def _params_reach_forward(program: Program) -> list[Diagnostic]:
    reached = reach(program, [program.forward], through_inits=False)
    declared = {d.name: d for d in program.declared if d.kind in (RefKind.PARAM, RefKind.FROZEN)}
    found = []
    for p in program.params:
        binding = declared[p.name]
        if not binding.used or p.name in reached:
            continue
        readers = [n for let in program.lets for n in let.names if p.name in refs([let.value])]
        if not readers:  # read where an error cut the tree short: reported already
            continue
        found.append(
            _error(
                program,
                binding.span,
                "E403",
                f"{'param' if p.trainable else 'frozen'} {p.name} never reaches the forward",
                f"only {', '.join(readers)} read{'s' if len(readers) == 1 else ''} it, and the forward does not",
            )
        )
    return found


def _residual_is_added_back(program: Program) -> list[Diagnostic]:
    """`residual W - E` takes E out of the layer: the forward must read what E is made of."""
    value = program.residual
    span = value.span
    if program.site == "input":
        hint = "only an output rule can add back what it removes"
        return [_error(program, span, "E303", "a residual needs an `output` rule", hint)]
    left, right = value.args if value.op in (Op.ADD, Op.SUB) else (None, None)
    if left is not None and left.op is Op.REF and left.value == "W":
        removed = right
    elif value.op is Op.ADD and right.op is Op.REF and right.value == "W":
        removed = left
    else:
        message = "a residual is `W - E`, E being what the forward adds back"
        return [_error(program, span, "E303", message, "write it as W - E")]
    needed = {n.value for n in walk([removed]) if n.op is Op.REF and n.ref_kind not in (RefKind.HYPER, RefKind.DIM)}
    missing = sorted(needed - reach(program, [program.forward], through_inits=True))
    if not missing:
        return []
    return [
        _error(
            program,
            span,
            "E303",
            f"the residual takes a term out of W that the forward never adds back: it does not read "
            f"{', '.join(missing)}",
            "add the term back in the output rule (as AntiPaSTO and PiSSA do), so the layer is the base at init",
        )
    ]
