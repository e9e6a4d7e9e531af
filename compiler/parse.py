"""Pass: text -> AST. Lark (LALR) parses with the grammar in grammar/adapter.lark; its tables are cached.

The AST is built while parsing (Lark calls `_Builder`'s method for a rule when it reduces it), so no parse tree
is made, and each node's span is computed here as Lark's `propagate_positions` would: from the start of the first
part of the rule to the end of its last, keywords and brackets included (the grammar keeps those tokens with `!`).
The spans are the same as that tree's; parsing, the largest part of a cold compile's time per spec, is faster.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args
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
def _parser(stop_too_deep: bool = True) -> Lark:
    """The LALR parser. Building its tables is most of a cold compile, so they are cached on disk in a file
    named by the grammar's hash and Lark's version (Lark also checks a hash of both when it loads one).
    `stop_too_deep`: raise _TooDeep as soon as an expression nests deeper than MAX_DEPTH allows."""
    grammar = GRAMMAR.read_text()
    folder = cache_dir()
    cache: str | bool = False
    if folder is not None:
        key = hashlib.sha256(f"{lark.__version__}\n{grammar}".encode()).hexdigest()[:16]
        cache = str(folder / f"adapter-grammar-{key}.lark-cache")
    return Lark(grammar, parser="lalr", transformer=_Builder(stop_too_deep), maybe_placeholders=True, cache=cache)


def parse(source: str, file: str) -> ast.Spec:
    """Parse one spec; a syntax error raises CompileError with a single diagnostic."""
    if len(source) > MAX_SOURCE_CHARS:
        _fail(source, file, Span(1, 1, 2), f"spec is {len(source)} characters; the limit is {MAX_SOURCE_CHARS}")
    _check_nesting(source, file)
    try:
        spec = _build(source, file)
    except UnexpectedInput as exc:
        _fail(source, file, *_describe(exc, source))
    return spec


class _TooDeep(Exception):
    """An expression nests deeper than MAX_DEPTH: the parser stops there."""


def _build(source: str, file: str) -> ast.Spec:
    """The AST. The builder measures how deep each expression nests, so only a spec with one too deep is walked
    (_check_depth): it is parsed again to the end (a syntax error after that expression is reported first) and
    the walk reports the node."""
    try:
        return _parser().parse(source)
    except _TooDeep:
        spec = _parser(stop_too_deep=False).parse(source)
    _check_depth(spec, source, file)
    return spec


def _fail(source: str, file: str, span: Span, message: str, hint: str | None = None) -> None:
    raise CompileError([Diagnostic(file, span.line, span.col, span.end_col, "E001", message, hint)], source)


# What the bracket count sees of a spec, a piece at a time: a docstring (to its end), a string (to its closing
# quote or the end of its line), a comment, a line break, a bracket, or a run of anything else.
_NESTING_PIECE = re.compile(r'"""[\s\S]*?(?:"""|\Z)|"(?:[^"\n\\]|\\[\s\S]?)*["\n]?|#[^\n]*|\n|[()\[\]]|[^"#\n()\[\]]+')


def _check_nesting(source: str, file: str) -> None:
    """Brackets close on the line they open (the grammar's rule): count them per line, outside text. A column
    counts a string, comment or docstring as one character, and restarts after a docstring."""
    depth, line, col = 0, 1, 0
    for match in _NESTING_PIECE.finditer(source):
        piece = match.group()
        if piece.startswith('"""'):
            line, col = line + piece.count("\n"), 0
        elif piece == "\n":
            depth, line, col = 0, line + 1, 0
        elif piece in "([":
            depth, col = depth + 1, col + 1
            if depth > MAX_NESTING:
                _fail(source, file, Span(line, col, col + 1), f"brackets nest deeper than {MAX_NESTING} levels")
        elif piece in ")]":
            depth, col = depth - 1, col + 1
        else:
            col += 1 if piece[0] in '"#' else len(piece)


def _check_depth(spec: ast.Spec, source: str, file: str) -> None:
    """Reject an expression nested deeper than MAX_DEPTH (a chain of 5,000 `+` is 5,000 deep): the passes after
    this one recurse over it. (Building it took no recursion: Lark's parser keeps its own stack.)"""
    stack = [(statement, 1) for statement in spec.statements]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            _fail(
                source,
                file,
                Span(node.span.line, node.span.col, node.span.col + 1),
                f"expression nests deeper than {MAX_DEPTH} operators",
                "split it into named parts with `let`",
            )
        stack.extend((kid, depth + 1) for kid in _parts(node))


def _parts(node: ast.Statement | ast.Expr) -> list[ast.Expr]:
    """The expressions directly inside a node, in source order."""
    found = []
    for value in vars(node).values():
        for part in value if isinstance(value, tuple) else (value,):
            if isinstance(part, ast.Expr):
                found.append(part)
    return found


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


class _Located:
    """An expression's node and the text it covers, brackets around it included: a span of a rule that starts
    or ends with this expression starts or ends where this text does."""

    __slots__ = ("node", "line", "column", "end_line", "end_column", "height")

    def __init__(self, node: ast.Expr, first: Token | _Located, last: Token | _Located, height: int = 1) -> None:
        self.node = node
        self.line, self.column = first.line, first.column
        self.end_line, self.end_column = last.end_line, last.end_column
        self.height = height  # operators on the longest path down from the node, itself included: 1 for a leaf


def _span(first: Token | _Located, last: Token | _Located) -> Span:
    """From the start of `first` to the end of `last`, cut to `first`'s line: one column there if it ends on
    another."""
    end = last.end_column if last.end_line == first.line else first.column + 1
    return Span(first.line, first.column, end)


def _binop(op: str):
    """The method building `left OP right`, for a rule whose operator token the grammar drops."""

    def build(self: _Builder, left: _Located, right: _Located) -> _Located:
        node = ast.BinOp(op, left.node, right.node, _span(left, right))
        return self.inner(node, left, right, max(left.height, right.height))

    return build


@v_args(inline=True)
class _Builder(Transformer):
    """One method per rule (or alias) of the grammar, which Lark calls with the rule's parts as it reduces it:
    tokens, None for an optional part left out, and what the methods returned for the rules inside."""

    def __init__(self, stop_too_deep: bool) -> None:
        super().__init__()
        self.stop_too_deep = stop_too_deep

    def inner(self, node: ast.Expr, first: Token | _Located, last: Token | _Located, below: int) -> _Located:
        """An operator's node, above parts whose tallest is `below` high."""
        if below + 1 >= MAX_DEPTH and self.stop_too_deep:  # its statement's walk would reach MAX_DEPTH + 1
            raise _TooDeep
        return _Located(node, first, last, below + 1)

    def start(self, header: tuple[Token, Token, Token | None], doc: Token | None, *statements) -> ast.Spec:
        name, title, url = header
        return ast.Spec(
            name=str(name),
            title=_string(title),
            url=str(url) if url is not None else None,
            doc=str(doc)[3:-3] if doc is not None else "",
            statements=statements,
            span=Span(name.line, name.column, name.end_column),
        )

    def header(self, name: Token, title: Token, url: Token | None) -> tuple[Token, Token, Token | None]:
        return name, title, url

    def hyper(self, keyword: Token, name: Token, _colon, kind: Token, _equals, default: _Located) -> ast.Hyper:
        return ast.Hyper(str(name), str(kind), default.node, _span(keyword, default))

    def param(self, keyword: Token, name: Token, *rest) -> ast.Param:
        return _tensor(keyword, name, rest, trainable=True)

    def frozen(self, keyword: Token, name: Token, *rest) -> ast.Param:
        return _tensor(keyword, name, rest, trainable=False)

    def shared(self, keyword: Token, tensor: ast.Param) -> ast.Param:
        end = tensor.span.end_col if tensor.span.line == keyword.line else keyword.column + 1
        return replace(tensor, span=Span(keyword.line, keyword.column, end), shared=True)

    def let(self, keyword: Token, *rest) -> ast.Let:
        *names, value = rest
        return ast.Let(tuple(str(n) for n in names if n.type == "NAME"), value.node, _span(keyword, value))

    def stat(self, keyword: Token, name: Token, _equals, value: _Located) -> ast.Stat:
        return ast.Stat(str(name), value.node, _span(keyword, value))

    def require(self, keyword: Token, cond: _Located, _colon, message: Token) -> ast.Require:
        return ast.Require(cond.node, _string(message), _span(keyword, message))

    def residual(self, keyword: Token, value: _Located) -> ast.Residual:
        return ast.Residual(value.node, _span(keyword, value))

    def target(self, keyword: Token, pattern: Token) -> ast.Target:
        return ast.Target(_string(pattern), _span(keyword, pattern))

    def output(self, keyword: Token, value: _Located) -> ast.Forward:
        return ast.Forward("output", value.node, _span(keyword, value))

    def input(self, keyword: Token, value: _Located) -> ast.Forward:
        return ast.Forward("input", value.node, _span(keyword, value))

    def number(self, token: Token) -> _Located:
        text = str(token)
        if text.isdigit():  # Python rejects leading zeros in an int literal: 007 is 7
            text = text.lstrip("0") or "0"
        return _Located(ast.Num(text, _span(token, token)), token, token)

    def name(self, token: Token) -> _Located:
        return _Located(ast.Name(str(token), _span(token, token)), token, token)

    def call(self, name: Token, *rest) -> _Located:  # rest: "(", the arguments and commas, ")"
        args = [a for a in rest if isinstance(a, _Located)]
        node = ast.Call(str(name), tuple(a.node for a in args), _span(name, rest[-1]))
        return self.inner(node, name, rest[-1], max((a.height for a in args), default=0))

    def group(self, opening: Token, inner: _Located, closing: Token) -> _Located:
        return _Located(inner.node, opening, closing, inner.height)

    def neg(self, minus: Token, operand: _Located) -> _Located:
        return self.inner(ast.Neg(operand.node, _span(minus, operand)), minus, operand, operand.height)

    def transpose(self, operand: _Located, suffix: Token) -> _Located:
        return self.inner(ast.Transpose(operand.node, _span(operand, suffix)), operand, suffix, operand.height)

    def compare(self, left: _Located, op: Token, right: _Located) -> _Located:
        node = ast.BinOp(str(op), left.node, right.node, _span(left, right))
        return self.inner(node, left, right, max(left.height, right.height))

    def cond(self, then: _Located, test: _Located, other: _Located) -> _Located:
        return _Located(ast.Cond(then.node, test.node, other.node, _span(then, other)), then, other)

    add, sub, mul, div, floordiv = _binop("+"), _binop("-"), _binop("*"), _binop("/"), _binop("//")
    mod, matmul, pow = _binop("%"), _binop("@"), _binop("**")


def _tensor(keyword: Token, name: Token, rest: tuple, trainable: bool) -> ast.Param:
    """`param` or `frozen`: rest is "[", the dims and commas (None when there are none), "]", "=", the init."""
    dims = tuple(d.node for d in rest[:-1] if isinstance(d, _Located))
    return ast.Param(str(name), dims, rest[-1].node, _span(keyword, rest[-1]), trainable=trainable)
