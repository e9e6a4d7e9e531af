"""The spec compiler: parse -> check -> emit. Imports neither torch nor the runtime."""

from __future__ import annotations


def compile_source(source: str, file: str) -> str:
    """Python source of the module generated from one spec; raises CompileError."""
    from .check import check
    from .emit import emit
    from .parse import parse

    return emit(check(parse(source, file), source, file))
