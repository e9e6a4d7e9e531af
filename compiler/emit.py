"""Pass: ordered program -> Python source, through the Jinja templates in templates/.

A printer: every decision (what is computed when, in which order a chain multiplies and into which
locals, which per-layer checks run) was made by an earlier pass; this module turns it into text the
way `ruff format` would write it. Every string that comes from a spec is emitted as an escaped
Python literal.
"""

from __future__ import annotations

import functools
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from lora_lite import __version__

from . import builtins
from .cache import cache_dir
from .diagnostics import CompileError, Diagnostic
from .dims import Dim
from .ir import (
    Apply,
    AtLeastOne,
    Broadcast,
    Divides,
    Expr,
    Folded,
    Hoisted,
    IndexBound,
    Leaf,
    MatrixChain,
    Node,
    Op,
    Part,
    Product,
    RankBound,
    RefKind,
    Staged,
    Step,
    TokenChain,
)
from .names import class_name, fresh
from .spec_hash import spec_hash
from .types import CONST, FORWARD, INIT, Stage, Type

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Precedence of emitted Python, loosest first.
P_CMP, P_ADD, P_MUL, P_NEG, P_POW, P_ATOM = range(6)
PREC = {"==": P_CMP, "!=": P_CMP, "<": P_CMP, "<=": P_CMP, ">": P_CMP, ">=": P_CMP, "+": P_ADD, "-": P_ADD}
PREC |= {"*": P_MUL, "/": P_MUL, "//": P_MUL, "%": P_MUL, "@": P_MUL, "**": P_POW}

TORCH_ELEMENTWISE = {"sqrt": "torch.sqrt", "exp": "torch.exp", "abs": "torch.abs", "elu": "torch.nn.functional.elu"}
TORCH_ELEMENTWISE |= {"sin": "torch.sin", "cos": "torch.cos"}
# builtins printed as `ops.<name>(args)`: their code is in lora_lite/ops.py
OPS_CALLS = frozenset(
    {"inv", "dot", "offdiag", "skew", "cayley", "cayley_neumann", "repeat_blocks", "topk_mix", "scatter", "ifft2"}
)
OPS_CALLS |= {"khatri_rao"}
MATH_ELEMENTWISE = {"sqrt": "math.sqrt", "exp": "math.exp", "abs": "abs", "sin": "math.sin", "cos": "math.cos"}
# A name, dotted name or number, possibly negated: ruff format writes `**` without spaces between two of these.
_SIMPLE_POWER_OPERAND = re.compile(r"-?([0-9][0-9.eE+-]*|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)")
_SIMPLE_POWER = re.compile(rf"{_SIMPLE_POWER_OPERAND.pattern}(\*\*{_SIMPLE_POWER_OPERAND.pattern})*")


def pystr(text: str) -> str:
    """A Python literal for any text, quoted as ruff format quotes it: double, unless that needs more escapes."""
    quote = "'" if text.count('"') > text.count("'") else '"'
    if text.isprintable() and quote not in text and "\\" not in text:  # nothing to escape (most names)
        return quote + text + quote
    return quote + "".join("\\" + c if c == quote else repr(c)[1:-1] for c in text) + quote


def docstring_text(text: str) -> str:
    """Text that is safe inside a triple-quoted docstring and reads the same."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def shape_text(shape: tuple[Dim, ...], token: bool = False) -> str:
    dims = (["..."] if token else []) + [str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def storage_shape(t: Type) -> tuple[Dim, ...]:
    """diag(v) values are stored as their vector v."""
    return t.shape[:1] if t.diag else t.shape


@dataclass
class Line:
    """One line of a generated method body, with its trailing comment."""

    code: str
    comment: str = ""
    line: int = 0  # the spec line it comes from, for a diagnostic about it
    verbatim: bool = False  # it holds a require's message as written


@dataclass
class Function:
    """Lines of one emitted method, with the locals it defined."""

    stage: Stage
    merge: bool = False  # the merged() method: float32 reads, no x
    lines: list[Line] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # names this method has read (each local is its name)
    prelude: list[Line] = field(default_factory=list)  # reads of constants and layer tensors
    dense: dict[Node, str] = field(default_factory=dict)  # merged(): each operator built as a matrix, its local


class Emitter:
    def __init__(self, program: Staged) -> None:
        self.p = program
        # The file name reaches comments and the docstring: keep it to characters that cannot end either.
        self.file = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(program.file).name)
        self.imports: set[str] = set()
        self.lets = {name: let for let in program.lets for name in let.names if name != "_"}
        self.buffer_names = {b.name for b in program.buffers}
        self.param_names = {p.name for p in program.params}
        self.shared_names = {p.name for p in program.params if p.shared}

    # ------------------------------------------------------------ module

    def module(self) -> str:
        p = self.p
        ctx = {
            "file": self.file,
            "hash": spec_hash(p.source),
            "version": __version__,
            "title": docstring_text(p.title),
            "url": docstring_text(p.url or ""),
            "doc": docstring_text(p.doc.strip("\n")),
            "source": docstring_text(p.source.rstrip("\n")),
            "cls": class_name(p.title, p.name),
            "name": pystr(p.name),
            "title_literal": pystr(p.title),
            "url_literal": pystr(p.url) if p.url else "None",
            "site": p.site,
            "estimates": ", ".join(f"{atom} = {size}" for atom, size in p.estimates),
            "formula": str(p.trainable_count),
            "quantizable": p.quantizable,
            "init_reads_weight": p.init_reads_weight,
            "identity_at_init": p.identity_at_init,
            "stats": ", ".join(f"{pystr(s.name)}: {pystr(s.kind)}" for s in p.stats),
            "stats_doc": ", ".join(f"{s.name} = {s.kind}(x)" for s in p.stats),
            "hypers": self.hyper_fields(),
            "post_init": self.post_init(),
            "target": pystr(p.target) if p.target is not None else None,
            "slots": self.slots(),
            "shared_slots": self.slots(shared=True),
            "shared_formula": str(p.shared_count),
            "shared_doc": textwrap.fill(  # lines within ruff's length, as every line of the module
                "Shared by every target (once per attach): "
                + ", ".join(f"{q.name} {shape_text(q.shape)}" for q in p.params if q.shared)
                + f"; trainable: {p.shared_count}.",
                LINE_LENGTH,
                break_long_words=False,
                break_on_hyphens=False,
            ),
            "shared_init": _indent(self.shared_init_body()) if self.shared_names else None,
            "check": _indent(self.check_body()),
            "init": _indent(self.init_body()),
            "residual": _indent(self.residual_body()) if p.residual is not None else None,
            "forward": _indent(self.forward_body()),
        }
        refusal, ctx["merged"] = self.merge_parts()
        ctx["merge_refusal"] = "None" if refusal is None else pystr(refusal)
        ctx["imports"] = sorted(self.imports)
        return _template("module.py.jinja").render(ctx)

    def atoms(self) -> dict[str, str]:
        atoms = {"d_in": "d_in", "d_out": "d_out", "max_d_in": "max_d_in", "max_d_out": "max_d_out"}
        atoms.update({h.name: f"cfg.{h.name}" for h in self.p.hypers})
        return atoms

    def dim(self, d: Dim) -> str:
        return d.code(self.atoms())

    def shape_code(self, shape: tuple[Dim, ...]) -> str:
        dims = [self.dim(d) for d in shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def where(self, line: int) -> str:
        return f"{self.file}:{line}"

    # ------------------------------------------------------------ config

    def hyper_fields(self) -> list[dict[str, str]]:
        fields = []
        for h in self.p.hypers:
            if h.default.op is Op.NUM:
                value = h.default.value
                default = value if h.type == "int" or "." in value or "e" in value.lower() else value + ".0"
                fields.append({"name": h.name, "type": h.type, "default": default})
            else:
                fields.append({"name": h.name, "type": f"{h.type} | None", "default": "None"})
        return fields

    def post_init(self) -> list[str]:
        lines = []
        fn = Function(CONST)
        for h in self.p.hypers:
            if h.default.op is not Op.NUM:
                code = self.code(h.default, fn).replace("cfg.", "self.")
                lines.append(f"if self.{h.name} is None:")
                lines.append(f"    self.{h.name} = {code}")
        return lines

    # ------------------------------------------------------------ slots and checks

    def slots(self, shared: bool = False) -> list[dict[str, str]]:
        """The per-layer slots, or (shared) the slots of the shared tensors."""
        slots = []
        for param in self.p.params:
            if param.shared != shared:
                continue
            slots.append(
                {
                    "name": pystr(param.name),
                    "shape": self.shape_code(param.shape),
                    "trainable": str(param.trainable),
                    "dtype": "torch.int64" if param.init.type.integer else "",
                    "where": self.where(param.line),
                }
            )
        for buffer in [] if shared else self.p.buffers:
            dims = storage_shape(buffer.value.type) if isinstance(buffer, Hoisted) else buffer.shape
            slots.append(
                {
                    "name": pystr(buffer.name),
                    "shape": self.shape_code(dims),
                    "trainable": "False",
                    "dtype": "",
                    "where": self.where(buffer.line),
                }
            )
        return self._mark_long(slots)

    @staticmethod
    def _mark_long(slots: list[dict[str, object]]) -> list[dict[str, object]]:
        """Flag slot lines that would pass the line length with their `# file:line` comment at the end."""
        for s in slots:
            code = f"{INDENT}    Slot({s['name']}, {s['shape']}, trainable={s['trainable']}),  # {s['where']}"
            s["long"] = len(code) > LINE_LENGTH
        return slots

    def check_body(self) -> list[Line]:
        fn = Function(CONST)
        fn.names.update({"d_in", "d_out"})
        for guard in self.p.guards:
            fn.lines.append(Line(f"if not ({self.condition(guard.cond, fn)}):", line=guard.line))
            problem = f"    problems.append({pystr(guard.message)})"
            fn.lines.append(Line(problem, line=guard.line, verbatim=guard.verbatim))
        self.hoist_consts(fn)
        return fn.lines

    def condition(self, cond: Expr | AtLeastOne | Divides | RankBound | IndexBound, fn: Function) -> str:
        if isinstance(cond, Divides):
            numerator, divisor = self.dim(cond.numerator), self.dim(cond.divisor)
            numerator = numerator if len(cond.numerator.terms) == 1 else f"({numerator})"
            divisor = divisor if re.fullmatch(r"[\w.]+", divisor) else f"({divisor})"
            return f"{numerator} % {divisor} == 0"
        if isinstance(cond, AtLeastOne):
            return f"{self.dim(cond.dim)} >= 1"
        if isinstance(cond, RankBound):
            rows, cols = self.dim(cond.rows), self.dim(cond.cols)
            bound = rows if cond.rows == cond.cols else f"min({rows}, {cols})"
            return f"{self.dim(cond.k)} <= {bound}"
        if isinstance(cond, IndexBound):
            return f"0 <= {self.code(cond.index, fn)} < {self.dim(cond.cols)}"
        return self.code(cond, fn)

    # ------------------------------------------------------------ init and residual

    def init_body(self) -> list[Line]:
        fn = Function(INIT)
        fn.names.update({"W", "d_in", "d_out"})
        for let in self.p.lets:
            if let.stage != INIT:
                continue
            value = self.code(let.value, fn)
            fn.names.update(n for n in let.names if n != "_")
            shapes = ", ".join(shape_text(storage_shape(t)) for t in let.types)
            fn.lines.append(Line(f"{', '.join(let.names)} = {value}", f"{shapes}  {self.where(let.line)}", let.line))
        for param in self.p.params:
            if param.shared:
                continue
            code = self.init_code(param.init, param.shape, fn, param.seed_key)
            fn.lines += _wrapped(param.name, code, f"{shape_text(param.shape)}  {self.where(param.line)}", param.line)
        for buffer in self.p.buffers:
            if isinstance(buffer, Hoisted):
                fn.lines.append(
                    Line(
                        f"{buffer.name} = {self.code(buffer.value, fn)}",
                        f"{shape_text(storage_shape(buffer.value.type))}  {self.where(buffer.line)}",
                        buffer.line,
                    )
                )
        saved = [p.name for p in self.p.params if not p.shared] + [b.name for b in self.p.buffers]
        self.returns(fn, saved)
        self.hoist_consts(fn)
        return fn.lines

    def shared_init_body(self) -> list[Line]:
        """The shared tensors' initial values, once per attach: fills and constants over max_d_in, max_d_out."""
        fn = Function(INIT)
        fn.names.update({"max_d_in", "max_d_out"})
        shared = [p for p in self.p.params if p.shared]
        for param in shared:
            code = self.init_code(param.init, param.shape, fn, param.seed_key, shared=True)
            fn.lines += _wrapped(param.name, code, f"{shape_text(param.shape)}  {self.where(param.line)}", param.line)
        self.returns(fn, [p.name for p in shared])
        self.hoist_consts(fn)
        return fn.lines

    def returns(self, fn: Function, saved: list[str]) -> None:
        """`return {"A": A, ...}` of the named locals."""
        items = [f"{pystr(name)}: {name}" for name in saved]  # a spec value's local is its name (names.Scope)
        if len(INDENT) + len(f"return {{{', '.join(items)}}}") <= LINE_LENGTH:
            fn.lines.append(Line(f"return {{{', '.join(items)}}}"))
        else:  # one entry a line, as ruff format writes a long dict
            fn.lines += [Line("return {"), *(Line(f"    {item},") for item in items), Line("}")]

    def init_code(
        self, init: Expr, shape: tuple[Dim, ...], fn: Function, seed_key: str | None = None, shared: bool = False
    ) -> str:
        """A param's init; a random fill of a frozen tensor (`seed_key` its name) draws from ops.layer_generator,
        or from ops.shared_generator for a shared one (the same values whatever the layers)."""
        shape_code = self.shape_code(shape)
        if init.op is Op.CALL and init.value in builtins.FILLS:
            if init.value not in builtins.RANDOM_FILLS:
                return f"torch.{init.value}({shape_code}, device=device)"
            self.imports.add("ops")
            args = "".join(f"{self.code(a, fn)}, " for a in init.args)
            seeded = "shared_generator" if shared else "layer_generator"
            generator = f", ops.{seeded}(cfg.seed, {pystr(seed_key)})" if seed_key else ""
            return f"ops.{init.value}({shape_code}, {args}device{generator})"
        value = self.code(init, fn)
        if init.type.is_python or (init.type.is_scalar and shape):
            return f"torch.full({shape_code}, {value}, device=device)"
        return value

    def residual_body(self) -> list[Line]:
        fn = Function(INIT)
        fn.names.add("W")
        value = self.code(self.p.residual, fn)
        fn.lines.append(Line(f"return {value}", self.where(self.p.residual_line), self.p.residual_line))
        self.hoist_consts(fn)
        return fn.lines

    # ------------------------------------------------------------ forward

    def forward_body(self) -> list[Line]:
        fn = Function(FORWARD)
        fn.names.update({"x", "y"})
        for let in self.p.lets:
            if let.stage == FORWARD:
                fn.lines.append(
                    Line(
                        f"{let.names[0]} = {self.code(let.value, fn)}",
                        f"{shape_text(storage_shape(let.types[0]), let.types[0].token)}  {self.where(let.line)}",
                        let.line,
                    )
                )
                fn.names.add(let.names[0])
        value = self.code(self.p.forward, fn)
        fn.lines.append(Line(f"return {value}", self.where(self.p.forward_line), self.p.forward_line))
        self.hoist_consts(fn)
        return fn.lines

    def merge_parts(self) -> tuple[str | None, str | None]:
        """Why the module refuses to merge (None if it merges), and merged()'s body. A merged weight whose terms
        do not fit the line length is refused here, not an error: the spec is fine, its forward only needs
        `let` names to merge."""
        refusal = self.p.merge_refusal
        if self.p.merge is not None:
            try:
                return None, _indent(self.merged_body())
            except LineTooLong:
                refusal = (
                    f"its merged weight does not fit lines of {LINE_LENGTH} characters: "
                    "name parts of the forward with `let` to merge it"
                )
        return refusal, None

    def merged_body(self) -> list[Line]:
        """The merged weight and bias, in float32: one return line, or the weight's terms summed a line each."""
        merge = self.p.merge
        fn = Function(FORWARD, merge=True)
        for let in merge.lets:
            shape = "(d_out, d_in)" if len(let.value.type.shape) == 2 else shape_text(let.value.type.shape)
            fn.lines.append(Line(f"{let.name} = {self.code(let.value, fn)}", f"{shape}  {self.where(let.line)}"))
            fn.names.add(let.name)
        bias = self.code(merge.bias, fn) if merge.bias is not None else "0.0"
        weight = self.code(merge.weight, fn)
        line = Line(f"return {weight}, {bias}", self.where(self.p.forward_line), self.p.forward_line)
        if len(INDENT + line.code) <= LINE_LENGTH:
            fn.lines.append(line)
        elif len(INDENT + f"{merge.local} = {weight}") <= LINE_LENGTH:
            fn.lines.append(Line(f"{merge.local} = {weight}", "(d_out, d_in)"))
            fn.lines.append(Line(f"return {merge.local}, {bias}", self.where(self.p.forward_line)))
        else:  # as ruff format writes a long sum: in parentheses, on one line if it fits, else a term a line
            fn.lines.append(Line(f"{merge.local} = ("))
            if len(INDENT + "    " + weight) <= LINE_LENGTH:
                fn.lines.append(Line(f"    {weight}"))
            else:
                (_, first), *rest = _terms(merge.weight, Op.ADD)
                fn.lines.append(Line(f"    {self.code(first, fn)}"))
                for op, term in rest:
                    text, prec = self.expr(term, fn)
                    fn.lines.append(Line(f"    {op.value} {text if prec > P_ADD else f'({text})'}"))
            fn.lines.append(Line(")"))
            fn.lines.append(Line(f"return {merge.local}, {bias}", self.where(self.p.forward_line)))
        self.hoist_consts(fn)
        return fn.lines

    def hoist_consts(self, fn: Function) -> None:
        """Put the reads a function's lines need (constants, layer tensors, sizes) first."""
        fn.lines[:0] = fn.prelude

    # ------------------------------------------------------------ expressions

    def code(self, node: Expr, fn: Function) -> str:
        return self.expr(node, fn)[0]

    def expr(self, node: Expr, fn: Function) -> tuple[str, int]:
        if isinstance(node, TokenChain):
            return self.token_chain(node, fn), P_ATOM
        if isinstance(node, MatrixChain):
            return self.scale(node.coefs, self.matrix_chain(node.tree, fn), fn)
        if node.op is Op.NUM:
            return node.value, P_ATOM
        if node.op is Op.REF:
            return self.ref(node, fn), P_ATOM
        if node.op is Op.NEG:
            if node.args[0].op is Op.NEG:  # --a and -(-a) both fail ruff (B002): emit a
                return self.expr(node.args[0].args[0], fn)
            text, prec = self.expr(node.args[0], fn)
            return "-" + (text if prec in (P_NEG, P_ATOM) else f"({text})"), P_NEG  # ruff writes -(a**b)
        if node.op is Op.T:
            if node.type.diag:
                return self.expr(node.args[0], fn)
            text, prec = self.expr(node.args[0], fn)
            suffix = ".mT" if len(node.type.shape) > 2 else ".T"  # a stack of matrices: each one transposed
            return (text if prec == P_ATOM else f"({text})") + suffix, P_ATOM
        if node.op is Op.CALL:
            return self.call(node, fn), P_ATOM
        if node.op is Op.IF:
            return self.conditional(node, fn), P_ATOM
        return self.binop(node, fn)

    def conditional(self, node: Node, fn: Function) -> str:
        """`if test:` and `else:` blocks, each computing its form into the local the order pass named."""
        test, *forms = node.args
        fn.lines.append(Line(f"if {self.code(test, fn)}:", self.where(node.span.line), node.span.line))
        for head, form in zip(("", "else:"), forms, strict=True):
            if head:
                fn.lines.append(Line(head))
            start = len(fn.lines)
            text = self.code(form, fn)
            if text != node.value:
                fn.lines.append(Line(f"{node.value} = {text}", shape_text(node.type.shape, node.type.token)))
            for line in fn.lines[start:]:
                line.code = "    " + line.code
        return node.value

    def binop(self, node: Node, fn: Function) -> tuple[str, int]:
        op = node.op.value
        prec = PREC[op]
        left, lp = self.expr(node.args[0], fn)
        right, rp = self.expr(node.args[1], fn)
        if op == "**":
            left = left if lp > P_POW else f"({left})"
            right = right if rp >= P_NEG else f"({right})"
            if _SIMPLE_POWER_OPERAND.fullmatch(left) and _SIMPLE_POWER.fullmatch(right):
                return f"{left}**{right}", prec  # ruff format hugs simple operands: x**2
        else:
            left = left if lp >= prec else f"({left})"
            right = right if rp > prec else f"({right})"
        return f"{left} {op} {right}", prec

    def call(self, node: Node, fn: Function) -> str:
        name = node.value
        if name == "dense":  # only in merged(): a structured operator as a matrix
            return self.dense(node, fn)
        args = [self.code(a, fn) for a in node.args]
        python = node.type.is_python
        if name in ("min", "max") and python:
            return f"{name}({args[0]}, {args[1]})"
        if name == "ceil_div":
            return f"-(-{_operand(node.args[0], args[0])} // {_operand(node.args[1], args[1])})"
        if name in ("min", "max"):
            tensor_first = node.args[0].type.kind == "tensor"
            value, bound = (args[0], args[1]) if tensor_first else (args[1], args[0])
            return f"torch.clamp({value}, {'min' if name == 'max' else 'max'}={bound})"
        if name == "clamp":
            return f"torch.clamp({args[0]}, {args[1]}, {args[2]})"
        if name == "eye":
            return f"torch.eye({args[0]}, device=device)"
        if name == "trace":
            return f"torch.trace({args[0]})"
        if name == "column":
            return f"{_atom(node.args[0], args[0])}[:, {args[1]}]"
        if name == "rows":
            return f"{_atom(node.args[0], args[0])}[{_upto(args[1])}]"
        if name == "cols":
            return f"{_atom(node.args[0], args[0])}[..., {_upto(args[1])}]"
        if name == "outer":  # only in merged(): u v^T, from a per-token scalar times a vector
            return f"torch.outer({args[0]}, {args[1]})"
        if name == "flatten":
            return f"{_atom(node.args[0], args[0])}.flatten(-2)"
        if name in OPS_CALLS:
            self.imports.add("ops")
            return f"ops.{name}({', '.join(args)})"
        if python:
            if MATH_ELEMENTWISE[name].startswith("math."):
                self.imports.add("math")
            return f"{MATH_ELEMENTWISE[name]}({args[0]})"
        if name in TORCH_ELEMENTWISE:
            return f"{TORCH_ELEMENTWISE[name]}({args[0]})"
        if name == "dropout":
            return f"torch.nn.functional.dropout({args[0]}, {args[1]}, layer.training)"
        if name == "reparametrize":
            self.imports.add("ops")
            return f"ops.reparametrize({args[0]}, {args[1]}, layer.training)"
        if name == "detach":
            return f"{_atom(node.args[0], args[0])}.detach()"
        if name in ("rownorm", "colnorm"):
            return f"torch.linalg.vector_norm({args[0]}, dim={1 if name == 'rownorm' else 0})"
        if name == "diag":
            return args[0]
        if name == "svd":
            self.imports.add("ops")
            return f"ops.svd({args[0]}, {args[1]}, cfg.svd_method)"
        raise AssertionError(name)

    def dense(self, node: Node, fn: Function) -> str:
        """Only in merged(): a structured operator (or its transpose) as its [rows, cols] matrix, the operator's
        transpose applied to the rows of the identity [rows, rows] (row i of M is M^T e_i): one rule for every
        operator of builtins.OPERATORS, by the same ops function the forward applies to x; an operator of
        builtins.DENSE_FORM is built by that builtin instead (sparse by scatter)."""
        if node in fn.dense:
            return fn.dense[node]
        call, transposed = node.args[0], False
        while call.op is Op.T:
            call, transposed = call.args[0], not transposed
        self.imports.add("ops")
        if call.value in builtins.DENSE_FORM:  # a builtin builds it (sparse as scatter), not identity rows
            args = ", ".join(self.code(a, fn) for a in call.args)
            return f"ops.{builtins.DENSE_FORM[call.value]}({args}){'.T' if transposed else ''}"
        rows = node.type.shape[0]
        for atom in sorted(rows.atoms() & {"d_in", "d_out"}):
            self.ref(Node(Op.REF, (), Type("int"), CONST, node.span, atom, RefKind.DIM), fn)
        if "device" not in fn.names:
            fn.names.add("device")
            fn.prelude.append(Line("device = ops.weight(layer).device"))
        args = "".join(f"{self.code(a, fn)}, " for a in call.args)
        eye = f"torch.eye({self.dim(rows)}, device=device)"
        taken = fn.names | set(self.lets) | self.param_names | self.buffer_names | {h.name for h in self.p.hypers}
        taken |= {self.p.merge.local} | {let.name for let in self.p.merge.lets}
        name = fresh(f"{call.value}_dense", taken)
        fn.names.add(name)
        code = f"ops.{call.value}({args}{eye}{'' if transposed else ', transpose=True'})"
        fn.prelude.append(Line(f"{name} = {code}", shape_text(node.type.shape)))
        fn.dense[node] = name
        return name

    def ref(self, node: Node, fn: Function) -> str:
        """A name's local (its own name); the first read in a method puts a line that reads it in front."""
        name = node.value
        if node.ref_kind is RefKind.HYPER:
            return f"cfg.{name}"
        if name in fn.names:
            return name
        fn.names.add(name)
        cast = ".to(x.dtype)" if fn.stage == FORWARD and not fn.merge else ".float()"
        cast = "" if node.type.integer else cast  # an index set stays int64
        if name in ("d_in", "d_out"):
            self.imports.add("ops")
            fn.prelude.append(Line(f"{name} = ops.{name}(layer)"))
        elif node.ref_kind is RefKind.LET and (node.stage == CONST or (fn.merge and node.stage == FORWARD)):
            let = self.lets[name]
            fn.prelude.append(Line(f"{name} = {self.code(let.value, fn)}", self.where(let.line), let.line))
        elif node.ref_kind is RefKind.STAT:
            fn.prelude.append(Line(f"{name} = stats[{pystr(name)}]", shape_text(node.type.shape)))
        elif name in self.shared_names:
            shape = node.type.shape[:1] if node.type.diag else node.type.shape
            fn.prelude.append(Line(f"{name} = layer.lora_shared.lora_{name}{cast}", shape_text(shape) + ", shared"))
        elif name in self.param_names or name in self.buffer_names:
            shape = node.type.shape[:1] if node.type.diag else node.type.shape
            fn.prelude.append(Line(f"{name} = layer.lora_{name}{cast}", shape_text(shape)))
        elif name == "W":
            self.imports.add("ops")
            fn.prelude.append(Line(f"W = ops.weight(layer){cast}", "(d_out, d_in)"))
        elif name == "bias":
            self.imports.add("ops")
            if fn.merge:
                fn.prelude.append(Line("bias = ops.bias_vector(layer)", "(d_out,), zeros when the layer has none"))
            else:
                fn.prelude.append(Line("bias = ops.bias(layer, x.dtype)", "(d_out,) or 0.0 when the layer has none"))
        else:
            raise AssertionError(f"{name} is not available here")
        return name

    # ------------------------------------------------------------ @ chains, in the order the order pass chose

    def scale(self, coefs: tuple[tuple[Op, Expr], ...], text: str, fn: Function) -> tuple[str, int]:
        """`text` times / over the scalar coefficients, in source order."""
        prec = P_ATOM if text.isidentifier() else P_ADD  # keep a product in parens: s * (B @ A)
        for op, coef in coefs:
            coef_text, coef_prec = self.expr(coef, fn)
            coef_text = coef_text if coef_prec > P_MUL else f"({coef_text})"
            left = text if prec >= P_MUL else f"({text})"
            text, prec = (f"{coef_text} * {left}" if op is Op.MUL else f"{left} / {coef_text}"), P_MUL
        return text, prec

    def token_chain(self, chain: TokenChain, fn: Function) -> str:
        """One line per step, into the locals the order pass named."""
        current = self.code(chain.source, fn)
        if chain.source_temp:
            text = self.scale(chain.coefs, current, fn)[0] if chain.scale_at == 0 else current
            fn.lines.append(Line(f"{chain.source_temp} = {text}", shape_text(chain.source.type.shape, token=True)))
            current = chain.source_temp
        for step_no, apply in enumerate(chain.steps, start=1):
            step = self.apply(apply, current, fn)
            if step_no == chain.scale_at:
                step = self.scale(chain.coefs, step, fn)[0]
            fn.lines.append(Line(f"{apply.result} = {step}", shape_text((apply.width,), token=True)))
            current = apply.result
        return current

    def apply(self, apply: Apply, current: str, fn: Function) -> str:
        """The code of one step applied to the per-token rows in `current`."""
        if apply.step in (Step.OPERATOR, Step.OPERATOR_T):
            self.imports.add("ops")
            call = apply.operand
            args = "".join(f"{self.code(a, fn)}, " for a in call.args)
            transpose = ", transpose=True" if apply.step is Step.OPERATOR_T else ""
            return f"ops.{call.value}({args}{current}{transpose})"
        text = self.code(apply.operand, fn)
        if apply.temp:
            shape = (apply.width,) if apply.step is Step.SCALE else apply.operand.type.shape
            fn.lines.append(Line(f"{apply.temp} = {text}", shape_text(shape)))
            text = apply.temp
        if apply.step is Step.SCALE:
            return f"{current} * {text}"
        return f"{current} @ {text}" if apply.step is Step.MATMUL else f"{current} @ {text}.T"

    def matrix_chain(self, tree: Part, fn: Function) -> str:
        """The product tree; the outer parentheses of a lone folded factor are dropped."""
        text = self.part(tree, fn)
        return text[1:-1] if isinstance(tree, Folded) else text

    def part(self, part: Part, fn: Function) -> str:
        if isinstance(part, Leaf):
            text, prec = self.expr(part.node, fn)
            return text if prec == P_ATOM else f"({text})"
        left, right = self.part(part.left, fn), self.part(part.right, fn)
        if isinstance(part, Folded):
            return f"({left}[:, None] * {right})" if part.how is Broadcast.ROWS else f"({left} * {right})"
        return f"{left} @ ({right})" if isinstance(part.right, Product) else f"{left} @ {right}"


# Formatting: the printer writes ruff format's layout itself (pystr's quotes, `g**2` hugging simple
# operands, a long dict one entry a line, a comment that would overflow moved above its line) rather
# than running ruff on the rendered text: ruff is a 24 MB binary the runtime install does not have, and
# these rules are about 40 lines. tests/test_compiler.py runs `ruff format --check` on generated/ and on
# specs made to hit each rule.
LINE_LENGTH = 120  # ruff's line-length for this project, generated code included
INDENT = "        "


class LineTooLong(Exception):
    def __init__(self, line: Line) -> None:
        super().__init__(line.code)
        self.line = line


def _indent(lines: list[Line]) -> str:
    """Method body text; a comment that would make its line too long goes on the line above."""
    out = []
    for line in lines:
        text = INDENT + line.code + (f"  # {line.comment}" if line.comment else "")
        if len(text) > LINE_LENGTH:
            if len(INDENT + line.code) > LINE_LENGTH:
                raise LineTooLong(line)
            out.append(f"{INDENT}# {line.comment}")
            text = INDENT + line.code
        out.append(text)
    return "\n".join(out)


def _wrapped(name: str, code: str, comment: str, line: int) -> list[Line]:
    """`name = code`; a call too long for one line is split one argument a line, as ruff format splits it,
    with the comment above it. Only calls whose arguments hold no comma outside brackets of their own."""
    if len(INDENT + f"{name} = {code}") <= LINE_LENGTH or not code.endswith(")") or "(" not in code:
        return [Line(f"{name} = {code}", comment, line)]
    head, _, body = code.partition("(")
    args, depth, start = [], 0, 0
    for i, ch in enumerate(body[:-1]):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            args.append(body[start:i].strip())
            start = i + 1
    args.append(body[start:-1].strip())
    return [
        Line(f"# {comment}", line=line),
        Line(f"{name} = {head}(", line=line),
        *(Line(f"    {arg},", line=line) for arg in args),
        Line(")", line=line),
    ]


def _terms(node: Expr, sign: Op) -> list[tuple[Op, Expr]]:
    """The terms of a sum of terms, left to right, each with the operator before it."""
    if isinstance(node, Node) and node.op in (Op.ADD, Op.SUB):
        return _terms(node.args[0], sign) + [(node.op, node.args[1])]
    return [(sign, node)]


def _upto(bound: str) -> str:
    """The slice `:bound`, spaced as ruff format spaces a slice bound that is not a name or a number."""
    return f":{bound}" if re.fullmatch(r"\w+", bound) else f": {bound}"


def _operand(node: Expr, text: str) -> str:
    """`text` as an operand of `//` (after a unary minus): a name, number or call as is, else in parentheses."""
    return text if node.op in (Op.CALL, Op.REF, Op.NUM) else f"({text})"


def _atom(node: Expr, text: str) -> str:
    return text if text.isidentifier() or node.op in (Op.CALL, Op.REF) else f"({text})"


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates' environment; their compiled code is cached beside the parser tables."""
    folder = cache_dir()
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        bytecode_cache=jinja2.FileSystemBytecodeCache(str(folder)) if folder is not None else None,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)


def emit(program: Staged) -> str:
    """The module's source; a line of it longer than LINE_LENGTH is an E204 diagnostic on its spec line."""
    try:
        return Emitter(program).module()
    except LineTooLong as exc:
        line = exc.line.line or 1
        width = len(INDENT + exc.line.code)
        message = f"this expression makes a {width}-character line of generated code"
        hint = f"split it into named parts with `let` (generated lines stay within {LINE_LENGTH} characters)"
        if exc.line.verbatim:  # a require's message is emitted whole
            message = message.replace("this expression", "this require's message")
            hint = f"shorten the message by {width - LINE_LENGTH} characters"
        text = program.source.splitlines()[line - 1] if program.source.splitlines() else ""
        raise CompileError(
            [Diagnostic(program.file, line, 1, max(2, len(text) + 1), "E204", message, hint)], program.source
        ) from None


def merge_refusal(program: Staged) -> str | None:
    """Why the generated module refuses to merge (the merge pass's reason, or a merged weight too long to
    print), or None when it defines merged()."""
    return Emitter(program).merge_parts()[0]


def emit_index(variants: list[tuple[str, str]]) -> str:
    """The package index: (variant class name, module name) pairs."""
    return _template("index.py.jinja").render(variants=sorted(variants), version=__version__)
