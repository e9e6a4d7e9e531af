"""The checker passes in order: typecheck -> fold -> lints -> stage -> merge. Every problem is reported together."""

from __future__ import annotations

from . import ast
from .diagnostics import raise_if_any
from .fold import fold
from .ir import Staged
from .lints import lint
from .merge import derive_merge
from .stage import stage
from .typecheck import typecheck


def check(spec: ast.Spec, source: str, file: str) -> Staged:
    """The staged program of a spec; raises CompileError with every problem found by any pass."""
    program = lint(fold(typecheck(spec, source, file)))
    if program.forward is None:  # nothing to stage
        raise_if_any(program.problems, source)
    staged = stage(program)
    raise_if_any(staged.problems, source)
    return derive_merge(staged)
