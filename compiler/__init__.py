"""The spec compiler, one module per pass: parse -> typecheck -> fold -> lints -> stage -> order -> emit.

Imports neither torch nor the runtime.
"""

from __future__ import annotations


def compile_source(source: str, file: str) -> str:
    """Python source of the module generated from one spec; raises CompileError."""
    from .check import check
    from .diagnostics import CompileError
    from .driver import builtin_clashes
    from .emit import emit
    from .order import order
    from .parse import parse

    program = check(parse(source, file), source, file)
    clashes = builtin_clashes(program, source, file)
    if clashes:
        raise CompileError(clashes, source)
    return emit(order(program))
