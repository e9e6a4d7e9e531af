"""The IR the passes hand each other: frozen dataclasses and tuples, so no pass can change its input.

    typecheck -> Program    every name resolved, every expression a typed, staged Node
    fold      -> Program    + the value of each constant at the defaults
    lints     -> Program    + the lint diagnostics
    stage     -> Staged     saved and hoisted buffers, forward lets, derived facts, runtime guards
    order     -> Staged     @ chains replaced by TokenChain / MatrixChain: their evaluation order as data

Nodes compare by structure: spans are left out of equality, so `r + 1` on two lines is one value.
"""

from __future__ import annotations

import re
from dataclasses import field, replace
from enum import Enum

from .diagnostics import Diagnostic, Span
from .dims import Dim
from .records import record
from .types import CONST, ERROR, Stage, Type


class Op(str, Enum):
    """What a Node computes."""

    NUM = "num"
    REF = "ref"
    CALL = "call"
    NEG = "neg"
    T = "T"  # transpose
    ERROR = "error"  # an expression a diagnostic was reported for
    IF = "if"  # (test, then, other): a per-layer choice; `value` names the local both branches assign (order)
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    FLOORDIV = "//"
    MOD = "%"
    MATMUL = "@"
    POW = "**"
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


COMPARISONS = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE})
BINARY = frozenset(Op) - {Op.NUM, Op.REF, Op.CALL, Op.NEG, Op.T, Op.ERROR, Op.IF}


class RefKind(str, Enum):
    """What a name refers to."""

    HYPER = "hyper"
    DIM = "dim"  # d_in, d_out
    INPUT = "input"  # x, y, W, bias
    PARAM = "param"
    FROZEN = "frozen"  # a tensor fixed at init: `frozen NAME[...] = init`, saved, never trained
    LET = "let"
    STAT = "stat"
    BUFFER = "buffer"  # a value the stage pass hoisted out of the forward


@record
class Node:
    """A typed expression. For REF, `value` is the name and `ref_kind` what it names; for CALL the builtin;
    for NUM the literal text."""

    op: Op
    args: tuple[Expr, ...]
    type: Type
    stage: Stage
    span: Span = field(compare=False)
    value: str = ""
    ref_kind: RefKind | None = None


# ---------------------------------------------------------------- ordered chains (the order pass's output)


class Step(str, Enum):
    """How one factor of a per-token chain is applied to the rows `h` (vectors are rows at run time)."""

    MATMUL_T = "h @ M.T"  # M @ h
    MATMUL = "h @ M"  # M.T @ h, M a named matrix: no transpose is built
    SCALE = "h * v"  # diag(v) @ h
    OPERATOR = "op(args, h)"  # op(args) @ h for a structured operator (builtins.OPERATORS): operand is the call
    OPERATOR_T = "op(args, h, transpose=True)"  # op(args).T @ h (also a merge's rows of W R)


@record
class Apply:
    """One step of a TokenChain: `result <- step(rows, operand)`, per-token rows of width `width`.

    `result` names the local that holds them; `temp`, when set, the local the operand is computed into
    first (an operand that is an expression, not a name)."""

    step: Step
    operand: Expr
    width: Dim
    result: str
    temp: str = ""


@record
class TokenChain:
    """`coefs * M1 @ ... @ Mk @ v` for a per-token v, run right to left: v first, then steps[0] (Mk) ...

    `scale_at` is where the scalar coefficients multiply: 0 the input rows, i the rows after steps[i - 1],
    -1 when there are none. Each step is one line of generated code: no dense product is ever formed.
    `source_temp`, when set, names a first line holding the (scaled) input rows.
    """

    source: Expr
    source_temp: str
    steps: tuple[Apply, ...]
    coefs: tuple[tuple[Op, Expr], ...]
    scale_at: int
    type: Type
    stage: Stage
    span: Span = field(compare=False)
    op: Op = field(default=Op.MATMUL, init=False)


@record
class Leaf:
    """A factor of a MatrixChain; `node` is the vector v of a diag(v) factor."""

    node: Expr
    rows: Dim
    cols: Dim | None  # None for a vector
    diag: bool


class Broadcast(str, Enum):
    """How a diagonal factor folds into its neighbour without building diag(v)."""

    DIAGS = "diag(u) @ diag(v) -> u * v"
    ROWS = "diag(v) @ M -> v[:, None] * M"
    VECTOR = "diag(v) @ u -> v * u"
    COLUMNS = "M @ diag(v) -> M * v"


@record
class Folded:
    """A diagonal factor folded into its neighbour (`how`), as a new factor of the chain."""

    how: Broadcast
    left: Part
    right: Part
    rows: Dim
    cols: Dim | None
    diag: bool


@record
class Product:
    """`left @ right`, in a MatrixChain's product tree."""

    left: Part
    right: Part


Part = Leaf | Folded | Product


@record
class MatrixChain:
    """A chain of matrices (no per-token value): diagonal factors folded, then the cheapest product tree."""

    tree: Part
    coefs: tuple[tuple[Op, Expr], ...]
    type: Type
    stage: Stage
    span: Span = field(compare=False)
    op: Op = field(default=Op.MATMUL, init=False)


Expr = Node | TokenChain | MatrixChain


# ---------------------------------------------------------------- statements


@record
class HyperInfo:
    """A hyper with its (typed) default."""

    name: str
    type: str
    default: Expr
    line: int


@record
class LetInfo:
    """A let: its names, value, one type per name and its stage."""

    names: tuple[str, ...]
    value: Expr
    types: tuple[Type, ...]
    stage: Stage
    line: int


@record
class ParamInfo:
    """A param, or a frozen tensor (`trainable` False): its symbolic shape and its init."""

    name: str
    shape: tuple[Dim, ...]
    init: Expr  # a fill call (zeros, normal(std), ...) or an init-time expression
    line: int
    trainable: bool = True
    shared: bool = False  # `shared param/frozen`: one tensor for every target, dims over max_d_in/max_d_out

    @property
    def seed_key(self) -> str | None:
        """What a random fill of a frozen tensor is seeded by (its name), None for a trainable param."""
        return None if self.trainable else self.name


@record
class StatInfo:
    """A calibration statistic the init reads."""

    name: str
    kind: str  # the statistic: cov, mean
    line: int


@record
class RequireInfo:
    """A require line: a constant comparison and the problem it reports."""

    cond: Expr
    message: str
    line: int


@record
class Declared:
    """A name the spec binds, for the lints: where, as what, and whether anything reads it."""

    name: str
    kind: RefKind
    span: Span
    used: bool
    broken: bool  # its type is an error: reported already


@record
class Program:
    """A type-checked spec, in statement order. `problems` holds every diagnostic found so far."""

    name: str
    title: str
    url: str | None
    doc: str
    source: str
    file: str
    hypers: tuple[HyperInfo, ...]
    lets: tuple[LetInfo, ...]
    params: tuple[ParamInfo, ...]
    stats: tuple[StatInfo, ...]
    requires: tuple[RequireInfo, ...]
    residual: Expr | None
    residual_line: int
    site: str  # "output" or "input"; "" when the spec has no forward rule
    forward: Expr | None
    forward_line: int
    target: str | None
    declared: tuple[Declared, ...]
    constants: tuple[tuple[str, Expr], ...]  # hypers and lets with a constant value, for the fold pass
    values: tuple[tuple[str, int | float], ...] = ()  # set by fold: their values at the defaults
    problems: tuple[Diagnostic, ...] = ()


# ---------------------------------------------------------------- staged


@record
class SavedLet:
    """An init-time let the forward or the residual reads: computed at attach, saved with the adapter."""

    name: str
    shape: tuple[Dim, ...]
    line: int


@record
class Hoisted:
    """An init-time value inside the forward, computed once at attach into a buffer of its own."""

    name: str
    value: Expr
    line: int

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.value.type.shape


Buffer = SavedLet | Hoisted


@record
class AtLeastOne:
    """A symbolic dim must be at least 1."""

    dim: Dim


@record
class Divides:
    """A dim `numerator // divisor` is exact: numerator % divisor == 0."""

    numerator: Dim
    divisor: Dim


@record
class RankBound:
    """svd's k <= min(m, n) (or <= m when m == n)."""

    k: Dim
    rows: Dim
    cols: Dim


@record
class IndexBound:
    """column(M, i): 0 <= i < cols."""

    index: Expr
    cols: Dim


@record
class Guard:
    """A condition a variant's `check()` tests per layer, with the problem it reports when false."""

    cond: Expr | AtLeastOne | Divides | RankBound | IndexBound  # an Expr: a require's comparison
    message: str
    line: int  # the spec line it comes from
    verbatim: bool = False  # the message is the spec's own text (a require's)


@record
class MergeLet:
    """A local of merged(): a forward let's merged weight [d_out, d_in] (under the let's own name) or bias."""

    name: str
    value: Expr
    line: int


@record
class MergeRule:
    """The weight [d_out, d_in] and bias [d_out] of one plain linear layer that computes what the adapted
    layer computes (the merge pass derives them from a forward rule affine in x); bias None is zero.
    `lets` come first: a forward let of the output's width is merged once, into locals later ones read."""

    weight: Expr
    bias: Expr | None
    lets: tuple[MergeLet, ...] = ()
    local: str = ""  # set by order: the local that sums the weight's terms when they do not fit one line


@record
class Staged:
    """What emit prints: the program with its init/forward split decided."""

    name: str
    title: str
    url: str | None
    doc: str
    source: str
    file: str
    hypers: tuple[HyperInfo, ...]
    lets: tuple[LetInfo, ...]  # forward lets read hoisted buffers instead of init-time work
    params: tuple[ParamInfo, ...]
    buffers: tuple[Buffer, ...]  # in spec order
    stats: tuple[StatInfo, ...]
    guards: tuple[Guard, ...]
    residual: Expr | None
    residual_line: int
    site: str
    forward: Expr
    forward_line: int
    target: str | None
    forward_reads_weight: bool
    init_reads_weight: bool
    problems: tuple[Diagnostic, ...] = ()
    estimates: tuple[tuple[str, int], ...] = ()  # set by order: the sizes its decisions assumed
    merge: MergeRule | None = None  # set by merge: one plain layer equal to the adapted one
    merge_refusal: str | None = None  # set by merge: why the forward has no merge (not affine in x)

    @property
    def has_residual(self) -> bool:
        return self.residual is not None

    @property
    def identity_at_init(self) -> bool:
        """What the docstring's "Identity at init:" line (the seed's recipe) claims: False when its text starts
        with "no", else True, as without the line. `lora_lite.verify` checks the claim either way."""
        claim = re.search(r"^\s*Identity at init:\s*(\w*)", self.doc, re.MULTILINE | re.IGNORECASE)
        return not (claim and claim.group(1).lower() == "no")

    @property
    def quantizable(self) -> bool:
        """A 4-bit/8-bit base works when the forward never reads W and nothing replaces it."""
        return not self.forward_reads_weight and self.residual is None

    @property
    def trainable_count(self) -> Dim:
        """Trainable numbers per target layer (shared params are counted once: `shared_count`)."""
        return self._count(shared=False)

    @property
    def shared_count(self) -> Dim:
        """Trainable numbers of the shared params, once per attach, over max_d_in and max_d_out."""
        return self._count(shared=True)

    def _count(self, shared: bool) -> Dim:
        total = Dim.const(0)
        for param in self.params:
            if not param.trainable or param.shared != shared:
                continue
            size = Dim.const(1)
            for dim in param.shape:
                size = size * dim
            total = total + size
        return total


def error_node(span: Span) -> Node:
    return Node(Op.ERROR, (), ERROR, CONST, span)


def with_args(node: Expr, args: tuple[Expr, ...]) -> Expr:
    """`node` with these arguments: `node` itself when each is the one it has, so a pass that rewrites a tree
    copies only the nodes above a change."""
    if len(args) == len(node.args) and all(new is old for new, old in zip(args, node.args, strict=True)):
        return node
    return replace(node, args=args)


def walk(roots: tuple[Expr, ...] | list[Expr]) -> list[Expr]:
    """Every node under the roots, each root's subtree in source order (depth first)."""
    found: list[Expr] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(reversed(node.args))
    return found


def refs(roots: tuple[Expr, ...] | list[Expr]) -> set[str]:
    """The names the roots read."""
    return {n.value for n in walk(roots) if n.op is Op.REF}


# ---------------------------------------------------------------- the shape of @ chains


def is_coef(node: Expr) -> bool:
    """A scalar that is the same for every token: it can multiply anywhere along a chain."""
    return node.type.is_scalar and not node.type.token


def has_chain(node: Expr) -> bool:
    """Whether `node` is an @ chain, possibly scaled: `alpha / r * B @ A @ x`."""
    return node.op is Op.MATMUL or (
        node.op in (Op.MUL, Op.DIV) and any(is_coef(a) for a in node.args) and any(has_chain(a) for a in node.args)
    )


def flatten_chain(node: Node) -> tuple[list[tuple[Op, Expr]], list[Expr]]:
    """Split a product into scalar coefficients and the factors of its @ chain.

    `alpha / r * B @ A @ x` -> ([(MUL, alpha / r)], [B, A, x]). A node that is not
    an @ chain gives ([], [node]).
    """
    if not has_chain(node):
        return [], [node]
    coefs: list[tuple[Op, Expr]] = []
    factors: list[Expr] = []

    def visit(n: Expr) -> None:
        left, right = n.args if len(n.args) == 2 else (None, None)
        if n.op is Op.MATMUL:
            visit(left)
            visit(right)
        elif n.op is Op.MUL and is_coef(left):
            coefs.append((Op.MUL, left))
            visit(right)
        elif n.op in (Op.MUL, Op.DIV) and is_coef(right):
            visit(left)
            coefs.append((n.op, right))
        else:
            factors.append(n)

    visit(node)
    return coefs, factors
