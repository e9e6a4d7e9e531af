"""Pass: decide what is computed at init and what in the hook; derive the facts the runtime reads.

Init-time lets the forward or the residual reads become saved buffers. An init-time subexpression
inside the forward (say `colnorm(W)`) is hoisted into a buffer of its own, so the hook never
recomputes it and never reads W for it. `@` chains are hoisted factor by factor: a low-rank chain is
never collapsed into a dense matrix. The guards are the per-layer checks the generated `check()` runs.
"""

from __future__ import annotations

from dataclasses import replace

from .diagnostics import Diagnostic, Span
from .dims import QUOTIENTS, Dim
from .ir import (
    AtLeastOne,
    Buffer,
    Divides,
    Expr,
    Guard,
    Hoisted,
    IndexBound,
    Node,
    Op,
    Program,
    RankBound,
    RefKind,
    RequireInfo,
    SavedLet,
    Staged,
    has_chain,
    refs,
    walk,
    with_args,
)
from .names import fresh
from .types import BOOL, CONST, ERROR, FORWARD, INIT, INT

D_IN, D_OUT = Dim.of("d_in"), Dim.of("d_out")
BUILTIN_NAMES = ("d_in", "d_out", "x", "y", "W", "bias")


def stage(program: Program) -> Staged:
    """The staged program. Its diagnostics (a statistic read in the forward, W read after a residual) join
    `problems`; the guards are derived only for a program without problems. Needs a forward rule."""
    hoister = _Hoister({d.name for d in program.declared} | set(BUILTIN_NAMES))
    lets = tuple(replace(let, value=hoister.hoist(let.value)) if let.stage == FORWARD else let for let in program.lets)
    forward = hoister.hoist(program.forward)
    residual = (program.residual,) if program.residual is not None else ()
    forward_roots = [forward] + [let.value for let in lets if let.stage == FORWARD]
    init_roots = [let.value for let in lets if let.stage == INIT] + [p.init for p in program.params]
    init_roots += [b.value for b in hoister.buffers]
    read = refs(forward_roots) | refs(residual)
    buffers: list[Buffer] = list(hoister.buffers)
    for let in lets:
        for name, t in zip(let.names, let.types, strict=True):
            if name in read and let.stage == INIT and t is not ERROR:
                buffers.append(SavedLet(name, t.shape, let.line))
    buffers.sort(key=lambda b: (b.line, isinstance(b, Hoisted)))
    problems: list[Diagnostic] = []
    for node in hoister.in_branch:
        message = "this init-time value is inside a conditional's form, where its shape may hold for some layers only"
        hint = "name it with a `let` before the conditional: it is then computed once at attach for every layer"
        problems.append(_error(program, node.span, "E301", message, hint))
    for node in walk(forward_roots + list(residual)):
        if node.op is Op.REF and node.ref_kind is RefKind.STAT:
            message = f"the statistic {node.value} is read at init only"
            hint = "compute what the forward needs from it with a `let`"
            problems.append(_error(program, node.span, "E301", message, hint))
    forward_reads_weight = "W" in refs(forward_roots)
    if program.residual is not None and forward_reads_weight:
        hint = "after a residual the layer holds W_res: read the original W through an init-time `let`"
        problems.append(_error(program, forward.span, "E305", "the forward reads W and the spec has a residual", hint))
    staged = Staged(
        name=program.name,
        title=program.title,
        url=program.url,
        doc=program.doc,
        source=program.source,
        file=program.file,
        hypers=program.hypers,
        lets=lets,
        params=program.params,
        buffers=tuple(buffers),
        stats=program.stats,
        guards=(),
        residual=program.residual,
        residual_line=program.residual_line,
        site=program.site,
        forward=forward,
        forward_line=program.forward_line,
        target=program.target,
        forward_reads_weight=forward_reads_weight,
        init_reads_weight="W" in refs(init_roots) or "W" in refs(residual),
    )
    if problems or program.problems:
        return replace(staged, problems=program.problems + tuple(problems))
    return replace(staged, guards=guards(staged, program.requires))


def _error(program: Program, span: Span, code: str, message: str, hint: str) -> Diagnostic:
    return Diagnostic(program.file, span.line, span.col, span.end_col, code, message, hint)


class _Hoister:
    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.buffers: list[Hoisted] = []
        self.branches = 0  # how deep in the forms of forward-time conditionals
        self.in_branch: list[Expr] = []  # init-time values found there: E301 (typed under the branch's facts)

    def hoist(self, node: Expr) -> Expr:
        """`node` with every init-time subexpression outside @ chains replaced by a read of a new buffer."""
        if node.op is Op.IF and node.stage == FORWARD:
            test, *forms = node.args
            self.branches += 1
            forms = [self.hoist(form) for form in forms]
            self.branches -= 1
            return replace(node, args=(test, *forms))
        if has_chain(node) or node.stage != INIT or node.op in (Op.REF, Op.NUM) or node.type is ERROR:
            return self._children(node)
        if node.op is Op.T and node.args[0].op is Op.REF:
            return node
        if node.op is Op.CALL and node.value == "diag":
            return self._children(node)
        if node.op is Op.CALL and len(node.args) == 1 and node.args[0].op is Op.REF:
            base = f"{node.value}_{node.args[0].value}"
        else:
            base = "frozen"
        if self.branches:
            self.in_branch.append(node)
            return node
        name = fresh(base, self.taken)
        self.taken.add(name)
        self.buffers.append(Hoisted(name, node, node.span.line))
        return Node(Op.REF, (), node.type, INIT, node.span, value=name, ref_kind=RefKind.BUFFER)

    def _children(self, node: Expr) -> Expr:
        return with_args(node, tuple(self.hoist(a) for a in node.args)) if node.args else node


def guards(staged: Staged, requires: tuple[RequireInfo, ...]) -> tuple[Guard, ...]:
    """The per-layer checks: requires, symbolic dims >= 1, svd ranks, column indices; each condition once."""
    found = [Guard(r.cond, r.message, r.line, verbatim=True) for r in requires if r.cond.type is not ERROR]
    sized = [(f"{'param' if p.trainable else 'frozen'} {p.name}", p.shape, p.line) for p in staged.params]
    sized += [(f"buffer {b.name}", b.shape, b.line) for b in staged.buffers]
    for what, shape, line in sized:
        for d in shape:
            if any(atom.startswith("max_d_") for atom in d.atoms()):
                continue  # a shared tensor's dim over the largest layer: at least that layer's size
            for atom in sorted(d.quotients()):
                numerator, divisor = QUOTIENTS[atom]
                found.append(Guard(Divides(numerator, divisor), f"{what} needs {divisor} to divide {numerator}", line))
            if d.constant is None and d not in (D_IN, D_OUT):
                found.append(Guard(AtLeastOne(d), f"{what} needs {d} >= 1", line))
    for let in staged.lets:
        if let.value.op is Op.CALL and let.value.value == "svd":
            m, n = let.value.args[0].type.shape
            k = let.types[1].shape[0]
            bound = str(m) if m == n else f"min({m}, {n})"
            found.append(Guard(RankBound(k, m, n), f"{source_text(staged, let.value)} needs {k} <= {bound}", let.line))
    roots = [let.value for let in staged.lets] + [p.init for p in staged.params]
    roots += [r for r in (staged.forward, staged.residual) if r is not None]
    roots += [b.value for b in staged.buffers if isinstance(b, Hoisted)]
    for node in walk(roots):
        if node.op is Op.CALL and node.value == "column":
            cols = node.args[0].type.shape[1]
            message = f"{source_text(staged, node)} needs 0 <= index < {cols}"
            found.append(Guard(IndexBound(node.args[1], cols), message, node.span.line))
        if node.op is Op.CALL and node.value == "rotate_half":
            found += _group_guards(staged, node)
    unique: dict[object, Guard] = {}
    for guard in found:
        unique.setdefault(guard.cond, guard)
    return tuple(unique.values())


def _group_guards(staged: Staged, node: Node) -> list[Guard]:
    """rotate_half(n, g) needs an even g >= 2 that divides n (`n % max(g, 1)`: no division by zero)."""
    n, g = node.args
    one, two, zero = (Node(Op.NUM, (), INT, CONST, node.span, str(k)) for k in (1, 2, 0))

    def is_zero(value: Node, by: Node) -> Node:
        rest = Node(Op.MOD, (value, by), INT, CONST, node.span)
        return Node(Op.EQ, (rest, zero), BOOL, CONST, node.span)

    call = source_text(staged, node)
    divisor = Node(Op.CALL, (g, one), INT, CONST, node.span, "max")
    return [
        Guard(
            Node(Op.GE, (g, two), BOOL, CONST, node.span), f"{call} needs a group size of at least 2", node.span.line
        ),
        Guard(is_zero(g, two), f"{call} needs an even group size", node.span.line),
        Guard(is_zero(n, divisor), f"{call} needs its group size to divide its size", node.span.line),
    ]


def source_text(staged: Staged, node: Expr) -> str:
    """The spec text of a node (its first line)."""
    line = staged.source.splitlines()[node.span.line - 1]
    return line[node.span.col - 1 : node.span.end_col - 1]
