"""The spec compiler, one module per pass: parse -> typecheck -> fold -> lints -> stage -> order -> emit.

Imports neither torch nor the runtime.
"""

from __future__ import annotations


def compile_source(source: str, file: str) -> str:
    """Python source of the module generated from one spec; raises CompileError."""
    from .check import check
    from .emit import emit
    from .order import order
    from .parse import parse

    return emit(order(check(parse(source, file), source, file)))
