"""Phase 3: checked Program -> Python source, through the Jinja templates in templates/.

The spec's math uses column vectors (`B @ A @ x`); tensors at run time are rows
with batch dims in front (`x` is [..., d_in]). The emitter translates: a chain
applied to a per-token vector runs right to left, one matmul per line
(`Ax = x @ A.T`, then `BAx = Ax @ B.T`), so a low-rank chain never forms a
dense matrix; `diag(v)` becomes a broadcast multiply; a chain of matrices is
ordered by the classic matrix-chain dynamic programme on estimated sizes.
Every string that comes from a spec is emitted as an escaped Python literal.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from lora_lite import __version__

from .check import class_name, flatten_chain
from .diagnostics import CompileError, Diagnostic
from .dims import Dim
from .spec_hash import spec_hash
from .types import CONST, ERROR, FORWARD, INIT, Node, Program, Type

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Precedence of emitted Python, loosest first.
P_CMP, P_ADD, P_MUL, P_NEG, P_POW, P_ATOM = range(6)
PREC = {"==": P_CMP, "!=": P_CMP, "<": P_CMP, "<=": P_CMP, ">": P_CMP, ">=": P_CMP, "+": P_ADD, "-": P_ADD}
PREC |= {"*": P_MUL, "/": P_MUL, "//": P_MUL, "%": P_MUL, "@": P_MUL, "**": P_POW}

TORCH_ELEMENTWISE = {"sqrt": "torch.sqrt", "exp": "torch.exp", "abs": "torch.abs", "elu": "torch.nn.functional.elu"}
MATH_ELEMENTWISE = {"sqrt": "math.sqrt", "exp": "math.exp", "abs": "abs"}
# A name, dotted name or number, possibly negated: ruff format writes `**` without spaces between two of these.
_SIMPLE_POWER_OPERAND = re.compile(r"-?([0-9][0-9.eE+-]*|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)")
_SIMPLE_POWER = re.compile(rf"{_SIMPLE_POWER_OPERAND.pattern}(\*\*{_SIMPLE_POWER_OPERAND.pattern})*")


def pystr(text: str) -> str:
    """A Python literal for any text, quoted as ruff format quotes it: double, unless that needs more escapes."""
    quote = "'" if text.count('"') > text.count("'") else '"'
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
    code: str
    comment: str = ""


@dataclass
class Function:
    """Lines of one emitted method, with the locals it defined."""

    stage: int
    lines: list[Line] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # spec name -> local code
    taken: set[str] = field(default_factory=set)
    prelude: list[Line] = field(default_factory=list)  # reads of constants and layer tensors
    spec_names: set[str] = field(default_factory=set)

    def temp(self, base: str) -> str:
        """A new local for a temporary: it avoids every spec name too, so those keep their own names."""
        name, n = base, 1
        while name in self.taken or name in self.spec_names:
            n += 1
            name = f"{base}{n}"
        self.taken.add(name)
        return name

    def fresh(self, base: str) -> str:
        """A new local named after a spec value (`base`) or a temporary, never shadowing another."""
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}{n}"
        self.taken.add(name)
        return name


class Emitter:
    def __init__(self, program: Program) -> None:
        self.p = program
        # The file name reaches comments and the docstring: keep it to characters that cannot end either.
        self.file = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(program.file).name)
        self.imports: set[str] = set()
        self.sizes = {"d_in": 4096, "d_out": 4096}
        for hyper in program.hypers:
            if hyper.default.op == "num":
                self.sizes[hyper.name] = max(1, int(float(hyper.default.value)))
        self.lets = {name: let for let in program.lets for name in let.names if name != "_"}
        self.buffer_names = {b.name for b in program.buffers}
        self.param_names = {p.name for p in program.params}

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
            "cls": class_name(p),
            "name": pystr(p.name),
            "title_literal": pystr(p.title),
            "url_literal": pystr(p.url) if p.url else "None",
            "site": p.site,
            "formula": str(p.trainable_count),
            "quantizable": p.quantizable,
            "init_reads_weight": p.init_reads_weight,
            "stats": ", ".join(f"{pystr(name)}: {pystr(kind)}" for name, kind, _ in p.stats),
            "stats_doc": ", ".join(f"{name} = {kind}(x)" for name, kind, _ in p.stats),
            "hypers": self.hyper_fields(),
            "post_init": self.post_init(),
            "target": pystr(p.target) if p.target is not None else None,
            "slots": self.slots(),
            "check": _indent(self.check_body()),
            "init": _indent(self.init_body()),
            "residual": _indent(self.residual_body()) if p.residual is not None else None,
            "forward": _indent(self.forward_body()),
        }
        ctx["imports"] = sorted(self.imports)
        return _template("module.py.jinja").render(ctx)

    def function(self, stage: int, taken: set[str] | None = None) -> Function:
        names = {h.name for h in self.p.hypers} | set(self.lets) | self.param_names | self.buffer_names
        names |= {name for name, _, _ in self.p.stats}
        return Function(stage, taken=set(taken or ()), spec_names=names)

    def atoms(self) -> dict[str, str]:
        atoms = {"d_in": "d_in", "d_out": "d_out"}
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
            if h.default.op == "num":
                value = h.default.value
                default = value if h.type == "int" or "." in value or "e" in value.lower() else value + ".0"
                fields.append({"name": h.name, "type": h.type, "default": default})
            else:
                fields.append({"name": h.name, "type": f"{h.type} | None", "default": "None"})
        return fields

    def post_init(self) -> list[str]:
        lines = []
        fn = self.function(CONST)
        for h in self.p.hypers:
            if h.default.op != "num":
                code = self.code(h.default, fn).replace("cfg.", "self.")
                lines.append(f"if self.{h.name} is None:")
                lines.append(f"    self.{h.name} = {code}")
        return lines

    # ------------------------------------------------------------ slots and checks

    def slots(self) -> list[dict[str, str]]:
        slots = []
        for param in self.p.params:
            slots.append(
                {
                    "name": pystr(param.name),
                    "shape": self.shape_code(param.shape),
                    "trainable": "True",
                    "where": self.where(param.line),
                }
            )
        for buffer in self.p.buffers:
            shape = buffer.value.type if buffer.value is not None else None
            dims = storage_shape(shape) if shape is not None else buffer.shape
            slots.append(
                {
                    "name": pystr(buffer.name),
                    "shape": self.shape_code(dims),
                    "trainable": "False",
                    "where": self.where(buffer.line),
                }
            )
        return slots

    def check_body(self) -> list[Line]:
        fn = self.function(CONST, taken={"cfg", "d_in", "d_out", "problems"})
        fn.names.update({"d_in": "d_in", "d_out": "d_out"})
        checks: list[tuple[str, str]] = []
        for cond, message, _line in self.p.requires:
            if cond.type is not ERROR:
                checks.append((self.code(cond, fn), message))
        sized = [(f"param {p.name}", p.shape) for p in self.p.params]
        sized += [(f"buffer {b.name}", b.shape) for b in self.p.buffers]
        for what, shape in sized:
            for d in shape:
                if d.constant is None and d not in (Dim.of("d_in"), Dim.of("d_out")):
                    checks.append((f"{self.dim(d)} >= 1", f"{what} needs {d} >= 1"))
        for let in self.p.lets:
            if let.value.op == "call" and let.value.value == "svd":
                m, n = let.value.args[0].type.shape
                k = let.types[1].shape[0]
                text = self.source_text(let.value)
                if m == n:
                    bound, shown = self.dim(m), str(m)
                else:
                    bound, shown = f"min({self.dim(m)}, {self.dim(n)})", f"min({m}, {n})"
                checks.append((f"{self.dim(k)} <= {bound}", f"{text} needs {k} <= {shown}"))
        roots = [let.value for let in self.p.lets] + [p.init for p in self.p.params]
        roots += [r for r in (self.p.forward, self.p.residual) if r is not None]
        for node in _walk(roots):
            if node.op == "call" and node.value == "column":
                cols = node.args[0].type.shape[1]
                index = self.code(node.args[1], fn)
                text = self.source_text(node)
                checks.append((f"0 <= {index} < {self.dim(cols)}", f"{text} needs 0 <= index < {cols}"))
        seen: set[str] = set()
        body = fn.lines
        for cond, message in checks:
            if cond in seen:
                continue
            seen.add(cond)
            body.append(Line(f"if not ({cond}):"))
            body.append(Line(f"    problems.append({pystr(message)})"))
        self.hoist_consts(fn)
        return body

    def source_text(self, node: Node) -> str:
        line = self.p.source.splitlines()[node.span.line - 1]
        return line[node.span.col - 1 : node.span.end_col - 1]

    # ------------------------------------------------------------ init and residual

    def init_body(self) -> list[Line]:
        fn = self.function(INIT, taken={"cfg", "d_in", "d_out", "W", "device", "stats"})
        fn.names.update({"W": "W", "d_in": "d_in", "d_out": "d_out"})
        for let in self.p.lets:
            if let.stage != INIT:
                continue
            names = [fn.fresh(n) if n != "_" else "_" for n in let.names]
            value = self.code(let.value, fn)
            fn.names.update({n: local for n, local in zip(let.names, names, strict=True) if n != "_"})
            shapes = ", ".join(shape_text(storage_shape(t)) for t in let.types)
            fn.lines.append(Line(f"{', '.join(names)} = {value}", f"{shapes}  {self.where(let.line)}"))
        returned = []
        for param in self.p.params:
            local = fn.fresh(param.name)
            fn.lines.append(
                Line(
                    f"{local} = {self.init_code(param.init, param.shape, fn)}",
                    f"{shape_text(param.shape)}  {self.where(param.line)}",
                )
            )
            returned.append((param.name, local))
        for buffer in self.p.buffers:
            if buffer.value is not None:
                local = fn.fresh(buffer.name)
                fn.lines.append(
                    Line(
                        f"{local} = {self.code(buffer.value, fn)}",
                        f"{shape_text(storage_shape(buffer.value.type))}  {self.where(buffer.line)}",
                    )
                )
                fn.names[buffer.name] = local
            returned.append((buffer.name, fn.names[buffer.name]))
        items = [f"{pystr(name)}: {local}" for name, local in returned]
        if len(INDENT) + len(f"return {{{', '.join(items)}}}") <= LINE_LENGTH:
            fn.lines.append(Line(f"return {{{', '.join(items)}}}"))
        else:  # one entry a line, as ruff format writes a long dict
            fn.lines += [Line("return {"), *(Line(f"    {item},") for item in items), Line("}")]
        self.hoist_consts(fn)
        return fn.lines

    def init_code(self, init: Node, shape: tuple[Dim, ...], fn: Function) -> str:
        shape_code = self.shape_code(shape)
        if init.op == "call" and not init.args:
            if init.value in ("kaiming", "kaiming_pairs"):
                self.imports.add("ops")
                return f"ops.{init.value}({shape_code}, device)"
            return f"torch.{init.value}({shape_code}, device=device)"
        value = self.code(init, fn)
        if init.type.is_python or (init.type.is_scalar and shape):
            return f"torch.full({shape_code}, {value}, device=device)"
        return value

    def residual_body(self) -> list[Line]:
        fn = self.function(INIT, taken={"layer", "cfg", "W", "d_in", "d_out"})
        fn.names["W"] = "W"
        value = self.code(self.p.residual, fn)
        fn.lines.append(Line(f"return {value}", self.where(self.p.residual_line)))
        self.hoist_consts(fn)
        return fn.lines

    # ------------------------------------------------------------ forward

    def forward_body(self) -> list[Line]:
        fn = self.function(FORWARD, taken={"layer", "cfg", "x", "y", "d_in", "d_out"})
        fn.names.update({"x": "x", "y": "y"})
        for let in self.p.lets:
            if let.stage == FORWARD:
                local = fn.fresh(let.names[0])
                fn.lines.append(
                    Line(
                        f"{local} = {self.code(let.value, fn)}",
                        f"{shape_text(storage_shape(let.types[0]), let.types[0].token)}  {self.where(let.line)}",
                    )
                )
                fn.names[let.names[0]] = local
        value = self.code(self.p.forward, fn)
        fn.lines.append(Line(f"return {value}", self.where(self.p.forward_line)))
        self.hoist_consts(fn)
        return fn.lines

    def hoist_consts(self, fn: Function) -> None:
        """Put the reads a function's lines need (constants, layer tensors, sizes) first."""
        fn.lines[:0] = fn.prelude

    # ------------------------------------------------------------ expressions

    def code(self, node: Node, fn: Function) -> str:
        return self.expr(node, fn)[0]

    def expr(self, node: Node, fn: Function) -> tuple[str, int]:
        if node.op == "num":
            return node.value, P_ATOM
        if node.op == "ref":
            return self.ref(node, fn), P_ATOM
        if node.op == "neg":
            if node.args[0].op == "neg":  # --a and -(-a) both fail ruff (B002): emit a
                return self.expr(node.args[0].args[0], fn)
            text, prec = self.expr(node.args[0], fn)
            return "-" + (text if prec in (P_NEG, P_ATOM) else f"({text})"), P_NEG  # ruff writes -(a**b)
        if node.op == "T":
            if node.type.diag:
                return self.expr(node.args[0], fn)
            text, prec = self.expr(node.args[0], fn)
            return (text if prec == P_ATOM else f"({text})") + ".T", P_ATOM
        if node.op == "call":
            return self.call(node, fn), P_ATOM
        coefs, factors = flatten_chain(node)
        if len(factors) > 1:
            return self.chain(coefs, factors, node, fn)
        return self.binop(node, fn)

    def binop(self, node: Node, fn: Function) -> tuple[str, int]:
        op = node.op
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
        args = [self.code(a, fn) for a in node.args]
        python = node.type.is_python
        if name in ("min", "max") and python:
            return f"{name}({args[0]}, {args[1]})"
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
        if name in ("inv", "dot", "offdiag"):
            self.imports.add("ops")
            return f"ops.{name}({', '.join(args)})"
        if python:
            if MATH_ELEMENTWISE[name].startswith("math."):
                self.imports.add("math")
            return f"{MATH_ELEMENTWISE[name]}({args[0]})"
        if name in TORCH_ELEMENTWISE:
            return f"{TORCH_ELEMENTWISE[name]}({args[0]})"
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

    def ref(self, node: Node, fn: Function) -> str:
        name = node.value
        if name in fn.names:
            return fn.names[name]
        prelude = fn.prelude
        if node.ref_kind == "hyper":
            return f"cfg.{name}"
        if name in ("d_in", "d_out"):
            fn.names[name] = name
            self.imports.add("ops")
            prelude.append(Line(f"{name} = ops.{name}(layer)"))
            return name
        if node.ref_kind == "let" and node.stage == CONST:
            let = self.lets[name]
            value = self.code(let.value, fn)
            local = fn.fresh(name)
            prelude.append(Line(f"{local} = {value}", self.where(let.line)))
            fn.names[name] = local
            return local
        if node.ref_kind == "stat":
            local = fn.fresh(name)
            prelude.append(Line(f"{local} = stats[{pystr(name)}]", shape_text(node.type.shape)))
            fn.names[name] = local
            return local
        cast = ".to(x.dtype)" if fn.stage == FORWARD else ".float()"
        if name in self.param_names or name in self.buffer_names:
            local = fn.fresh(name)
            shape = node.type.shape[:1] if node.type.diag else node.type.shape
            prelude.append(Line(f"{local} = layer.lora_{name}{cast}", shape_text(shape)))
        elif name == "W":
            self.imports.add("ops")
            local = fn.fresh("W")
            prelude.append(Line(f"{local} = ops.weight(layer){cast}", "(d_out, d_in)"))
        elif name == "bias":
            self.imports.add("ops")
            local = fn.fresh("bias")
            prelude.append(Line(f"{local} = ops.bias(layer, x.dtype)", "(d_out,) or 0.0 when the layer has none"))
        else:
            raise AssertionError(f"{name} is not available here")
        fn.names[name] = local
        return local

    # ------------------------------------------------------------ @ chains

    def chain(self, coefs: list[tuple[str, Node]], factors: list[Node], node: Node, fn: Function) -> tuple[str, int]:
        if factors[-1].type.token:
            return self.token_chain(coefs, factors, fn), P_ATOM
        return self.scale(coefs, self.matrix_chain(factors, fn), fn)

    def scale(self, coefs: list[tuple[str, Node]], text: str, fn: Function) -> tuple[str, int]:
        """`text` times / over the scalar coefficients, in source order."""
        prec = P_ATOM if text.isidentifier() else P_ADD  # keep a product in parens: s * (B @ A)
        for op, coef in coefs:
            coef_text, coef_prec = self.expr(coef, fn)
            coef_text = coef_text if coef_prec > P_MUL else f"({coef_text})"
            left = text if prec >= P_MUL else f"({text})"
            text, prec = (f"{coef_text} * {left}" if op == "*" else f"{left} / {coef_text}"), P_MUL
        return text, prec

    def token_chain(self, coefs: list[tuple[str, Node]], factors: list[Node], fn: Function) -> str:
        """s * M1 @ M2 @ ... @ v for a per-token v: right to left, one line per factor.

        The scalar coefficients go where the rows are narrowest (`Ax` of width r in
        `s * B @ A @ x`), so scaling costs r multiplies per token instead of d_out.
        """
        *matrices, last = factors
        widths = [last.type.shape[-1].estimate(self.sizes)]
        widths += [f.type.shape[0].estimate(self.sizes) for f in reversed(matrices)]
        narrowest = widths.index(min(widths)) if coefs else -1
        current = self.code(last, fn)
        label = current if current.isidentifier() else ""
        if not current.isidentifier() or narrowest == 0:
            text = self.scale(coefs, current, fn)[0] if narrowest == 0 else current
            name = fn.temp("s" + current if narrowest == 0 and current.isidentifier() else "h")
            fn.lines.append(Line(f"{name} = {text}", shape_text(last.type.shape, token=True)))
            current = label = name
        for step_no, factor in enumerate(reversed(matrices), start=1):
            short, step = self.apply_factor(factor, current, fn)
            label = short + label
            if step_no == narrowest:
                step = self.scale(coefs, step, fn)[0]
                label = "s" + label
            name = fn.temp(label if len(label) <= 12 else "h")
            dims = (factor.type.shape[0],)
            fn.lines.append(Line(f"{name} = {step}", shape_text(dims, token=True)))
            current = name
        return current

    def apply_factor(self, factor: Node, current: str, fn: Function) -> tuple[str, str]:
        """(short label, code) of applying one chain factor to the per-token rows in `current`."""
        if factor.type.operator == "householder":
            self.imports.add("ops")
            return "R", f"ops.householder({self.code(factor.args[0], fn)}, {current})"
        if factor.type.diag:
            inner = factor.args[0] if factor.op == "call" else factor
            text = self.code(inner, fn)
            if not text.isidentifier():
                name = fn.temp("d")
                fn.lines.append(Line(f"{name} = {text}", shape_text(factor.type.shape[:1])))
                text = name
            return text, f"{current} * {text}"
        if factor.op == "T" and factor.args[0].op == "ref":
            text = self.code(factor.args[0], fn)
            return text + "T", f"{current} @ {text}"
        text = self.code(factor, fn)
        if not text.isidentifier():
            name = fn.temp("M")
            fn.lines.append(Line(f"{name} = {text}", shape_text(factor.type.shape)))
            text = name
        return text, f"{current} @ {text}.T"

    def matrix_chain(self, factors: list[Node], fn: Function) -> str:
        """A chain without per-token values: diags fold into neighbours, then the cheapest order."""
        items = []
        for factor in factors:
            text, prec = self.expr(factor.args[0] if _is_diag_call(factor) else factor, fn)
            items.append(_Item(text if prec == P_ATOM else f"({text})", *_dims(factor.type), factor.type.diag))
        folded: list[_Item] = []
        for item in items:
            if folded and folded[-1].diag and item.diag:
                folded[-1] = _Item(f"({folded[-1].text} * {item.text})", item.rows, item.cols, True)
            elif folded and folded[-1].diag:
                prev = folded.pop()
                text = f"{prev.text}[:, None] * {item.text}" if item.cols is not None else f"{prev.text} * {item.text}"
                folded.append(_Item(f"({text})", item.rows, item.cols, False))
            elif folded and item.diag:
                prev = folded.pop()
                folded.append(_Item(f"({prev.text} * {item.text})", prev.rows, prev.cols, False))
            else:
                folded.append(item)
        if len(folded) == 1:
            text = folded[0].text
            return text[1:-1] if text.startswith("(") and _balanced(text[1:-1]) else text
        return self.order(folded)

    def order(self, items: list[_Item]) -> str:
        n = len(items)
        dims = [items[0].rows.estimate(self.sizes)] + [
            i.cols.estimate(self.sizes) if i.cols is not None else 1 for i in items
        ]
        cost = [[0] * n for _ in range(n)]
        split = [[0] * n for _ in range(n)]
        for length in range(2, n + 1):
            for i in range(n - length + 1):
                j = i + length - 1
                cost[i][j] = min(cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1] for k in range(i, j))
                split[i][j] = next(
                    k
                    for k in range(i, j)
                    if cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1] == cost[i][j]
                )

        def build(i: int, j: int) -> str:
            """Items i..j in the chosen order; `@` groups left to right, so only a right product needs parens."""
            if i == j:
                return items[i].text
            k = split[i][j]
            left, right = build(i, k), build(k + 1, j)
            return f"{left} @ {right}" if k + 1 == j else f"{left} @ ({right})"

        return build(0, n - 1)


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


@dataclass
class _Item:
    text: str
    rows: Dim
    cols: Dim | None
    diag: bool


def _dims(t: Type) -> tuple[Dim, Dim | None]:
    return (t.shape[0], t.shape[1] if len(t.shape) == 2 else None)


def _walk(roots: list[Node]) -> list[Node]:
    """Every node under the roots, each root's subtree in source order."""
    found = []
    for root in roots:
        found.append(root)
        found.extend(_walk(root.args))
    return found


def _is_diag_call(node: Node) -> bool:
    return node.op == "call" and node.value == "diag"


def _atom(node: Node, text: str) -> str:
    return text if text.isidentifier() or node.op in ("call", "ref") else f"({text})"


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _template(name: str) -> jinja2.Template:
    return _environment().get_template(name)


def emit(program: Program) -> str:
    try:
        return Emitter(program).module()
    except LineTooLong as exc:
        found = re.search(r":(\d+)$", exc.line.comment)
        line = int(found.group(1)) if found else 1
        message = f"this expression makes a {len(INDENT + exc.line.code)}-character line of generated code"
        hint = f"split it into named parts with `let` (generated lines stay within {LINE_LENGTH} characters)"
        requires = [n for _, text, n in program.requires if exc.line.code == f"    problems.append({pystr(text)})"]
        if requires:  # a require's message is emitted whole
            line, message = requires[0], message.replace("this expression", "this require's message")
            hint = f"shorten the message by {len(INDENT + exc.line.code) - LINE_LENGTH} characters"
        text = program.source.splitlines()[line - 1] if program.source.splitlines() else ""
        raise CompileError(
            [Diagnostic(program.file, line, 1, max(2, len(text) + 1), "E204", message, hint)], program.source
        ) from None


def emit_index(variants: list[tuple[str, str]]) -> str:
    """The package index: (variant class name, module name) pairs."""
    return _template("index.py.jinja").render(variants=sorted(variants), version=__version__)
