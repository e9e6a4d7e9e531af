"""Diagnostics: one record per problem, printed like a C compiler.

    specs/dora.adapter:12:9: error[E201]: B is [d_out, r] but is used as [r, d_out]
       12 | output y + B.T @ x
          |            ^^^
    hint: ...

Tests compare the records (file, line, col, code, message, hint), not the prose.
"""

from __future__ import annotations

from lora_lite._text import capped

from .records import record

MAX_REPORTED = 20
MAX_SOURCE_CHARS = 250_000  # 100 times the longest spec; parsing it takes seconds, not minutes


@record
class Span:
    """A 1-based source range; `end_col` is exclusive and on `line` when a node spans lines."""

    line: int
    col: int
    end_col: int


@record
class Diagnostic:
    """One problem, as a record: tests compare these, not the printed text."""

    file: str
    line: int
    col: int
    end_col: int
    code: str
    message: str
    hint: str | None = None

    def render(self, source: str) -> str:
        head = f"{self.file}:{self.line}:{self.col}: error[{self.code}]: {self.message}"
        lines = source.splitlines()
        out = [head]
        if 1 <= self.line <= len(lines):
            text = lines[self.line - 1].expandtabs(1)
            gutter = f"{self.line:>5} | "
            width = max(1, min(self.end_col, len(text) + 1) - self.col)
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * (self.col - 1) + "^" * width)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


class CompileError(Exception):
    """Every problem found in one spec; `str()` is the printable report."""

    def __init__(self, diagnostics: list[Diagnostic], source: str) -> None:
        self.diagnostics = diagnostics
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        shown = capped(self.diagnostics, MAX_REPORTED)
        return "\n".join(d if isinstance(d, str) else d.render(self.source) for d in shown)


class Reporter:
    """Collects diagnostics for one spec file."""

    def __init__(self, file: str, source: str) -> None:
        self.file = file
        self.source = source
        self.diagnostics: list[Diagnostic] = []

    def error(self, span: Span, code: str, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(self.file, span.line, span.col, span.end_col, code, message, hint))


def raise_if_any(diagnostics: tuple[Diagnostic, ...], source: str) -> None:
    """Raise every problem of one spec at once, in source order."""
    if diagnostics:
        raise CompileError(sorted(diagnostics, key=_order), source)


def _order(d: Diagnostic) -> tuple[int, int, str]:
    return (d.line, d.col, d.code)
