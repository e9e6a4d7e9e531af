"""Pass: text -> AST. Lark (LALR) parses with the grammar in grammar/adapter.lark; its tables are cached."""

from __future__ import annotations

import difflib
import functools
import hashlib
from dataclasses import replace
from pathlib import Path

import lark
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .cache import cache_dir
from .diagnostics import MAX_SOURCE_CHARS, CompileError, Diagnostic, Span

GRAMMAR = Path(__file__).resolve().parent.parent / "grammar" / "adapter.lark"
KEYWORDS = ("adapter", "hyper", "param", "frozen", "let", "stat", "require", "residual", "target", "output", "input")
KEYWORDS += ("shared",)  # `shared param ...`, `shared frozen ...`
MAX_NESTING = 64  # brackets
MAX_DEPTH = 100  # operators in one expression: the checker and emitter recurse over it


@functools.cache
def _parser() -> Lark:
    """The LALR parser. Building its tables is most of a cold compile, so they are cached on disk in a file
    named by the grammar's hash and Lark's version (Lark also checks a hash of both when it loads one)."""
    grammar = GRAMMAR.read_text()
    folder = cache_dir()
    cache: str | bool = False
    if folder is not None:
        key = hashlib.sha256(f"{lark.__version__}\n{grammar}".encode()).hexdigest()[:16]
        cache = str(folder / f"adapter-grammar-{key}.lark-cache")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, cache=cache)


def parse(source: str, file: str) -> ast.Spec:
    """Parse one spec; a syntax error raises CompileError with a single diagnostic."""
    if len(source) > MAX_SOURCE_CHARS:
        _fail(source, file, Span(1, 1, 2), f"spec is {len(source)} characters; the limit is {MAX_SOURCE_CHARS}")
    _check_nesting(source, file)
    try:
        tree = _parser().parse(source)
    except UnexpectedInput as exc:
        _fail(source, file, *_describe(exc, source))
    _check_depth(tree, source, file)
    return _Builder().spec(tree)


def _fail(source: str, file: str, span: Span, message: str, hint: str | None = None) -> None:
    raise CompileError([Diagnostic(file, span.line, span.col, span.end_col, "E001", message, hint)], source)


def _check_nesting(source: str, file: str) -> None:
    """Brackets close on the line they open (the grammar's rule): count them per line, outside text."""
    depth, line, col, i, n = 0, 1, 0, 0, len(source)
    while i < n:
        char = source[i]
        col += 1
        if source.startswith('"""', i):  # a docstring: skip to its end
            end = source.find('"""', i + 3)
            end = n if end == -1 else end + 3
            line += source.count("\n", i, end)
            col, i = 0, end
            continue
        if char == '"':  # a string: skip to its closing quote on this line
            i += 1
            while i < n and source[i] not in '"\n':
                i += 2 if source[i] == "\\" else 1
            i += 1
            continue
        if char == "#":
            i = source.find("\n", i)
            i = n if i == -1 else i
            continue
        if char == "\n":
            depth, line, col = 0, line + 1, 0
        depth += 1 if char in "([" else -1 if char in ")]" else 0
        if depth > MAX_NESTING:
            _fail(source, file, Span(line, col, col + 1), f"brackets nest deeper than {MAX_NESTING} levels")
        i += 1


def _check_depth(tree: Tree, source: str, file: str) -> None:
    """Reject an expression nested deeper than MAX_DEPTH (a chain of 5,000 `+` is 5,000 deep)."""
    stack = [(statement, 1) for statement in tree.children if isinstance(statement, Tree)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            span = _span(node)
            _fail(
                source,
                file,
                Span(span.line, span.col, span.col + 1),
                f"expression nests deeper than {MAX_DEPTH} operators",
                "split it into named parts with `let`",
            )
        stack.extend((kid, depth + 1) for kid in node.children if isinstance(kid, Tree))


def _describe(exc: UnexpectedInput, source: str) -> tuple[Span, str, str | None]:
    line, col = max(exc.line, 1), max(exc.column, 1)
    text = source.splitlines()[line - 1] if 0 < line <= len(source.splitlines()) else ""
    if isinstance(exc, UnexpectedCharacters):
        if text[col - 1 : col] == '"':
            return Span(line, col, col + 1), "unclosed string", 'a string ends with " on the same line'
        return Span(line, col, col + 1), f"unexpected character {text[col - 1 : col]!r}", None
    token = exc.token if isinstance(exc, UnexpectedToken) else None
    expected = set(getattr(exc, "expected", ()) or ())
    if isinstance(exc, UnexpectedEOF) or token is None or token.type == "$END":
        return Span(line, col, col + 1), "unexpected end of file", _bracket_hint(text)
    width = max(1, len(str(token).splitlines()[0]) if str(token).strip() else 1)
    span = Span(line, col, col + width)
    if token.type == "STRING" and text[col - 1 : col + 2] == '"""':
        return Span(line, col, col + 3), "unclosed docstring", 'end it with """'
    if token.type == "_NL":
        if expected & {"RPAR", "RSQB", "COMMA"} and _bracket_hint(text):
            return Span(line, len(text) + 1, len(text) + 2), "unclosed bracket", _bracket_hint(text)
        if "EQUAL" in expected:
            return Span(line, len(text) + 1, len(text) + 2), f"missing '=' in {text.split()[0]}", None
        return Span(line, len(text) + 1, len(text) + 2), "unexpected end of line", None
    if token.type == "NAME" and col == len(text) - len(text.lstrip()) + 1:
        close = difflib.get_close_matches(str(token), KEYWORDS, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"a statement starts with one of: {', '.join(KEYWORDS[1:])}"
        return span, f"unknown statement {str(token)!r}", hint
    if "EQUAL" in expected and token.type != "EQUAL":
        return span, f"missing '=' in {text.split()[0]}", None
    if token.type in ("EQUAL", "COLON") and expected & {"RPAR", "RSQB"} and _bracket_hint(text[: col - 1]):
        return span, "unclosed bracket", _bracket_hint(text)
    return span, f"unexpected {str(token)!r}", None


def _bracket_hint(text: str) -> str | None:
    opened = text.count("(") + text.count("[") - text.count(")") - text.count("]")
    return "close every '(' and '[' on the same line" if opened > 0 else None


def _span(node: Tree | Token) -> Span:
    if isinstance(node, Token):
        return Span(node.line, node.column, node.column + len(str(node).splitlines()[0] or " "))
    meta = node.meta
    end = meta.end_column if meta.end_line == meta.line else meta.column + 1
    return Span(meta.line, meta.column, end)


def _string(token: Token) -> str:
    """The text of a "..." literal: backslash escapes only \\ and \", nothing is evaluated."""
    body = str(token)[1:-1]
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


_BINOPS = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "div": "/",
    "floordiv": "//",
    "mod": "%",
    "matmul": "@",
    "pow": "**",
}


class _Builder:
    def spec(self, tree: Tree) -> ast.Spec:
        header, doc, *statements = tree.children
        name, title, url = header.children
        text = str(doc)[3:-3] if doc is not None else ""
        return ast.Spec(
            name=str(name),
            title=_string(title),
            url=str(url) if url is not None else None,
            doc=text,
            statements=tuple(self.statement(s) for s in statements),
            span=_span(name),
        )

    def statement(self, node: Tree) -> ast.Statement:
        kids = node.children
        span = _span(node)
        match node.data:
            case "hyper":
                return ast.Hyper(str(kids[0]), str(kids[1]), self.expr(kids[2]), span)
            case "param":
                dims = tuple(self.expr(d) for d in kids[1:-1] if d is not None)
                return ast.Param(str(kids[0]), dims, self.expr(kids[-1]), span)
            case "frozen":
                dims = tuple(self.expr(d) for d in kids[1:-1] if d is not None)
                return ast.Param(str(kids[0]), dims, self.expr(kids[-1]), span, trainable=False)
            case "shared":
                return replace(self.statement(kids[0]), span=span, shared=True)
            case "let":
                return ast.Let(tuple(str(k) for k in kids[:-1]), self.expr(kids[-1]), span)
            case "stat":
                return ast.Stat(str(kids[0]), self.expr(kids[1]), span)
            case "require":
                return ast.Require(self.expr(kids[0]), _string(kids[1]), span)
            case "residual":
                return ast.Residual(self.expr(kids[0]), span)
            case "target":
                return ast.Target(_string(kids[0]), span)
            case "output" | "input":
                return ast.Forward(str(node.data), self.expr(kids[0]), span)
        raise AssertionError(node.data)

    def expr(self, node: Tree) -> ast.Expr:
        span = _span(node)
        kids = node.children
        match node.data:
            case "number":
                text = str(kids[0])
                if text.isdigit():  # Python rejects leading zeros in an int literal: 007 is 7
                    text = text.lstrip("0") or "0"
                return ast.Num(text, span)
            case "name":
                return ast.Name(str(kids[0]), span)
            case "call":
                args = tuple(self.expr(a) for a in kids[1:] if a is not None)
                return ast.Call(str(kids[0]), args, span)
            case "neg":
                return ast.Neg(self.expr(kids[0]), span)
            case "transpose":
                return ast.Transpose(self.expr(kids[0]), span)
            case "compare":
                return ast.BinOp(str(kids[1]), self.expr(kids[0]), self.expr(kids[2]), span)
            case op if op in _BINOPS:
                return ast.BinOp(_BINOPS[op], self.expr(kids[0]), self.expr(kids[1]), span)
        raise AssertionError(node.data)
