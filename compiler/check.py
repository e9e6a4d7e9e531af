"""Phase 2: AST -> checked Program.

Resolves every name, types every expression (shapes are symbolic Dims), stages
each value (constant, init-time or forward-time), hoists init-time work out of
the forward into frozen buffers, and collects every error in the spec.
"""

from __future__ import annotations

import difflib
import keyword
import math
import re
from dataclasses import dataclass

from . import ast, builtins
from .diagnostics import Reporter, Span
from .dims import Dim
from .types import (
    BOOL,
    CONST,
    ERROR,
    FLOAT,
    FORWARD,
    INIT,
    INT,
    STAGE_NAMES,
    BufferInfo,
    HyperInfo,
    LetInfo,
    Node,
    ParamInfo,
    Program,
    Type,
    tensor,
)

D_IN, D_OUT = Dim.of("d_in"), Dim.of("d_out")

# Names the generated code uses itself, and fields every config already has.
RESERVED = frozenset(keyword.kwlist) | {
    "cfg",
    "layer",
    "torch",
    "ops",
    "math",
    "F",
    "device",
    "problems",
    "self",
    "Tensor",
    "dataclass",
    "dtype",
    "variant",
    "target_names",
    "target_roles",
    "target_layers",
    "exclude_names",
    "svd_method",
    "stats",
    "hyper_fields",
    "to_dict",
    "from_dict",
    # Python builtins that run or reach code: no spec value is named like them, so a generated module never
    # mentions them (tests/test_hostile_specs.py checks its AST).
    "eval",
    "exec",
    "compile",
    "open",
    "globals",
    "locals",
    "vars",
    "getattr",
    "setattr",
    "delattr",
    "breakpoint",
}
HYPER_TYPES = {"int": INT, "float": FLOAT}
# Names a generated module binds at its top level: a variant class cannot take them.
MODULE_NAMES = frozenset({"None", "True", "False", "Tensor", "Slot", "Variant", "AdapterConfig", "nn", "torch"})
MAX_CONSTANT = 10**100  # constant folding stops following a value beyond this
MAX_EXPONENT = 1024  # `2 ** 10 ** 10` would never finish, in the compiler or in the generated code


def class_name(program: Program) -> str:
    """The variant class named from the title's words: "IA3-FF" gives IA3FF."""
    words = re.findall(r"[A-Za-z0-9]+", program.title) or [program.name]
    name = "".join(w if w[0].isupper() or w[0].isdigit() else w.capitalize() for w in words)
    return name if name[0].isalpha() else "V" + name


@dataclass
class Binding:
    kind: str  # hyper, dim, input, param, let
    type: Type
    stage: int
    span: Span | None = None
    dim: Dim | None = None  # for int constants usable in shapes
    used: bool = False


class Checker:
    def __init__(self, spec: ast.Spec, source: str, file: str) -> None:
        self.spec = spec
        self.report = Reporter(file, source)
        self.program = Program(spec.name, spec.title, spec.url, spec.doc, source, file)
        self.env: dict[str, Binding] = {
            "d_in": Binding("dim", INT, CONST, dim=D_IN, used=True),
            "d_out": Binding("dim", INT, CONST, dim=D_OUT, used=True),
            "x": Binding("input", tensor(D_IN, token=True), FORWARD, used=True),
            "y": Binding("input", tensor(D_OUT, token=True), FORWARD, used=True),
            "W": Binding("input", tensor(D_OUT, D_IN), INIT, used=True),
            "bias": Binding("input", tensor(D_OUT), FORWARD, used=True),
        }
        self.y_uses: list[Span] = []
        self.forward_span: Span | None = None
        self.constants: dict[str, int | float] = {}  # hypers and constant lets, at the defaults

    # ----------------------------------------------------------------- statements

    def run(self) -> Program:
        if self.spec.name in RESERVED or not self.spec.name.isidentifier() or self.spec.name.startswith("_"):
            self.report.error(self.spec.span, "E103", f"{self.spec.name!r} cannot name a variant")
        cls = class_name(self.program)
        if cls in MODULE_NAMES or f"{cls}Config" in MODULE_NAMES:
            self.report.error(
                self.spec.span,
                "E103",
                f"the title {self.spec.title!r} gives the class name {cls!r}, which the generated module uses",
                "pick another title",
            )
        for statement in self.spec.statements:
            getattr(self, "_" + type(statement).__name__.lower())(statement)
        self._finish()
        self.report.raise_if_any()
        return self.program

    def _hyper(self, s: ast.Hyper) -> None:
        declared = HYPER_TYPES.get(s.type)
        if declared is None:
            self.report.error(s.span, "E202", f"unknown hyper type {s.type!r}", "hypers are int or float")
        default = self.expr(s.default, "hyper")
        if default.type is not ERROR and declared is not None:
            if default.stage > CONST or not default.type.is_python or default.type.kind == "bool":
                self.report.error(default.span, "E202", f"the default of hyper {s.name} must be a number")
            elif declared is INT and default.type.kind != "int":
                self.report.error(default.span, "E202", f"hyper {s.name} is int but its default is {default.type.kind}")
        if self.bind(s.name, s.span, Binding("hyper", declared or ERROR, CONST, s.span)):
            if declared is INT:
                self.env[s.name].dim = Dim.of(s.name)
            self.program.hypers.append(HyperInfo(s.name, s.type, default, s.span.line))
            if default.type is not ERROR and default.stage == CONST:
                self._fold_constant(s.name, default)

    def _param(self, s: ast.Param) -> None:
        shape = tuple(d for d in (self.dim(e) for e in s.dims) if d is not None)
        declared = tensor(*shape) if len(shape) == len(s.dims) else ERROR  # a bad dim was reported already
        if isinstance(s.init, ast.Name) and s.init.id in builtins.FILLS:
            init = Node("call", [], declared, CONST, s.init.span, value=s.init.id)
        else:
            init = self.expr(s.init, "param")
            if init.type is not ERROR and len(shape) == len(s.dims):
                if init.stage > INIT:
                    self.report.error(
                        init.span,
                        "E301",
                        f"the init of param {s.name} is {STAGE_NAMES[init.stage]}",
                        "a param's init may read W, hypers and init-time lets, not params, x or y",
                    )
                elif not (init.type.is_scalar or (init.type.shape == shape and not init.type.diag)):
                    self.report.error(init.span, "E201", f"param {s.name} is {declared} but its init is {init.type}")
        if self.bind(s.name, s.span, Binding("param", declared, FORWARD, s.span)):
            self.program.params.append(ParamInfo(s.name, shape, init, s.span.line))

    def _let(self, s: ast.Let) -> None:
        value = self.expr(s.value, "let")
        types: tuple[Type, ...]
        if value.type.kind == "tuple":
            types = value.type.items
            if len(types) != len(s.names):
                self.report.error(s.span, "E202", f"{value.value}() gives {len(types)} values, not {len(s.names)}")
                types = (ERROR,) * len(s.names)
        elif len(s.names) != 1:
            if value.type is not ERROR:
                self.report.error(s.span, "E202", f"one value cannot be unpacked into {len(s.names)} names")
            types = (ERROR,) * len(s.names)
        else:
            types = (value.type,)
        for name, t in zip(s.names, types, strict=True):
            if name == "_":
                continue
            binding = Binding("let", t, value.stage, s.span)
            if t.kind == "int" and value.stage == CONST:
                binding.dim = self.dim_of(value)
            if self.bind(name, s.span, binding) and t.is_python and value.stage == CONST:
                self._fold_constant(name, value)
        self.program.lets.append(LetInfo(s.names, value, types, value.stage, s.span.line))

    def _stat(self, s: ast.Stat) -> None:
        value = s.value
        fn = value.fn if isinstance(value, ast.Call) else None
        reads_x = isinstance(value, ast.Call) and [getattr(a, "id", None) for a in value.args] == ["x"]
        if fn not in builtins.STATISTICS or not reads_x:
            self.report.error(
                value.span,
                "E202",
                "a stat is a statistic of the layer input: "
                + " or ".join(f"{name}(x)" for name in builtins.STATISTICS),
            )
            return
        t = tensor(D_IN, D_IN) if fn == "cov" else tensor(D_IN)
        if self.bind(s.name, s.span, Binding("stat", t, INIT, s.span)):
            self.program.stats.append((s.name, fn, s.span.line))

    def _require(self, s: ast.Require) -> None:
        cond = self.expr(s.cond, "require")
        if cond.type is not ERROR and (cond.type.kind != "bool" or cond.stage > CONST):
            self.report.error(
                cond.span, "E202", "require takes a comparison of constants (hypers, d_in, d_out, numbers)"
            )
        elif cond.type is not ERROR:
            self._check_require(cond, s.message)
        self.program.requires.append((cond, s.message, s.span.line))

    def _fold_constant(self, name: str, value: Node) -> None:
        """Record the value of a hyper or constant let at the defaults; report arithmetic that fails."""
        try:
            folded = fold(value, self.constants)
        except (ArithmeticError, ValueError) as exc:
            self.report.error(value.span, "E203", f"{name} cannot be computed: {exc}")
            return
        if isinstance(folded, float) and not math.isfinite(folded):
            self.report.error(value.span, "E203", f"{name} is {folded} at the defaults")
        elif folded is not None:
            self.constants[name] = folded

    def _check_require(self, cond: Node, message: str) -> None:
        """A require that reads no layer size is decided by the defaults: it must hold for them."""
        try:
            holds = fold(cond, self.constants)
        except (ArithmeticError, ValueError) as exc:
            self.report.error(cond.span, "E304", f"this require cannot be evaluated at the defaults: {exc}")
            return
        if holds is False:
            names = sorted(n.value for n in _nodes([cond]) if n.op == "ref" and n.value in self.constants)
            given = ", ".join(f"{n} = {self.constants[n]}" for n in names)
            self.report.error(
                cond.span,
                "E304",
                f"this require fails for the default hypers{f' ({given})' if given else ''}: {message}",
                "change the defaults so that every require holds",
            )

    def _residual(self, s: ast.Residual) -> None:
        if self.program.residual is not None:
            self.report.error(s.span, "E102", "a spec has at most one residual")
            return
        value = self.expr(s.value, "residual")
        if value.type is not ERROR:
            if value.stage > INIT:
                self.report.error(
                    value.span,
                    "E301",
                    f"the residual is {STAGE_NAMES[value.stage]}",
                    "the residual is computed once at attach: it may read W, hypers and init-time lets",
                )
            elif value.type != tensor(D_OUT, D_IN):
                self.report.error(value.span, "E201", f"the residual replaces W [d_out, d_in], not {value.type}")
        self.program.residual, self.program.residual_line = value, s.span.line

    def _target(self, s: ast.Target) -> None:
        if self.program.target is not None:
            self.report.error(s.span, "E102", "a spec has at most one target line")
        try:
            re.compile(s.pattern)
        except re.error as exc:
            self.report.error(s.span, "E202", f"the target is not a valid regex: {exc}")
        self.program.target = s.pattern

    def _forward(self, s: ast.Forward) -> None:
        if self.forward_span is not None:
            self.report.error(s.span, "E102", "a spec has exactly one forward rule (`input` or `output`)")
            return
        self.forward_span = s.span
        value = self.expr(s.value, "forward")
        want = tensor(D_OUT if s.site == "output" else D_IN, token=True)
        if value.type is not ERROR and value.type != want:
            self.report.error(
                value.span, "E201", f"the {s.site} rule must give a per-token [{want.shape[0]}], not {value.type}"
            )
        self.program.site, self.program.forward, self.program.forward_line = s.site, value, s.span.line

    def _finish(self) -> None:
        program = self.program
        if self.forward_span is None:
            self.report.error(
                self.spec.span, "E302", "the spec has no forward rule", "add `output <expr>` or `input <expr>`"
            )
            return
        if program.site == "input":
            for span in self.y_uses:
                self.report.error(span, "E301", "y is the layer output: an `input` rule runs before the layer")
        for name, binding in self.env.items():
            if binding.used or binding.span is None or binding.kind == "hyper" or binding.type is ERROR:
                continue
            what = binding.kind if binding.kind in ("param", "stat") else "let"
            code = "E401" if binding.kind == "param" else "E402"
            self.report.error(binding.span, code, f"{what} {name} is never used")
        self._check_params_reach_forward()
        if program.residual is not None and program.residual.type is not ERROR:
            self._check_residual_is_added_back()
        _Stager(self).run()

    def _reach(self, roots: list[Node], through_inits: bool) -> set[str]:
        """Every name the roots read, through lets (and param inits when `through_inits`)."""
        values = {n: let.value for let in self.program.lets for n in let.names if n != "_"}
        if through_inits:
            values.update({p.name: p.init for p in self.program.params})
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node.op == "ref" and node.value not in seen:
                seen.add(node.value)
                if node.value in values:
                    stack.append(values[node.value])
            stack.extend(node.args)
        return seen

    def _check_params_reach_forward(self) -> None:
        reached = self._reach([self.program.forward], through_inits=False)
        for p in self.program.params:
            binding = self.env[p.name]
            if not binding.used or p.name in reached:
                continue
            readers = [n for let in self.program.lets for n in let.names if p.name in _refs([let.value])]
            if not readers:  # read where an error cut the tree short: reported already
                continue
            self.report.error(
                binding.span,
                "E403",
                f"param {p.name} never reaches the forward",
                f"only {', '.join(readers)} read{'s' if len(readers) == 1 else ''} it, and the forward does not",
            )

    def _check_residual_is_added_back(self) -> None:
        """`residual W - E` takes E out of the layer: the forward must read what E is made of."""
        program, value = self.program, self.program.residual
        span = value.span
        if program.site == "input":
            self.report.error(
                span, "E303", "a residual needs an `output` rule", "only an output rule can add back what it removes"
            )
            return
        left, right = value.args if value.op in ("+", "-") else (None, None)
        if left is not None and left.op == "ref" and left.value == "W":
            removed = right
        elif value.op == "+" and right.op == "ref" and right.value == "W":
            removed = left
        else:
            self.report.error(
                span, "E303", "a residual is `W - E`, E being what the forward adds back", "write it as W - E"
            )
            return
        needed = {n.value for n in _nodes([removed]) if n.op == "ref" and n.ref_kind not in ("hyper", "dim")}
        missing = sorted(needed - self._reach([program.forward], through_inits=True))
        if missing:
            self.report.error(
                span,
                "E303",
                f"the residual takes a term out of W that the forward never adds back: it does not read "
                f"{', '.join(missing)}",
                "add the term back in the output rule (as AntiPaSTO and PiSSA do), so the layer is the base at init",
            )

    # ----------------------------------------------------------------- names

    def bind(self, name: str, span: Span, binding: Binding) -> bool:
        if name in self.env:
            self.report.error(span, "E102", f"{name} is already defined")
            return False
        if name in RESERVED or name in builtins.NAMES or name.startswith("_"):
            self.report.error(span, "E103", f"{name!r} is reserved", "pick another name")
            self.env[name] = Binding(binding.kind, ERROR, binding.stage, span, used=True)  # no "unknown name" later
            return False
        self.env[name] = binding
        return True

    # ----------------------------------------------------------------- expressions

    def dim(self, e: ast.Expr) -> Dim | None:
        node = self.expr(e, "dim")
        if node.type is ERROR:
            return None
        result = self.dim_of(node) if node.stage == CONST and node.type.kind == "int" else None
        if result is None:
            self.report.error(
                node.span, "E202", "a dimension is built from int hypers, d_in, d_out and integers with + - *"
            )
        elif result.constant is not None and result.constant < 1:
            self.report.error(node.span, "E202", f"a dimension is at least 1, not {result.constant}")
            return None
        return result

    def dim_of(self, node: Node) -> Dim | None:
        if node.op == "num":
            return Dim.const(int(node.value))
        if node.op == "ref":
            return self.env[node.value].dim
        if node.op in ("+", "-", "*"):
            left, right = (self.dim_of(a) for a in node.args)
            if left is None or right is None:
                return None
            return left + right if node.op == "+" else left - right if node.op == "-" else left * right
        return None

    def expr(self, e: ast.Expr, where: str) -> Node:
        match e:
            case ast.Num():
                return self._num(e)
            case ast.Name():
                return self._name(e, where)
            case ast.Call():
                return self._call(e, where)
            case ast.Neg():
                arg = self.expr(e.operand, where)
                if arg.type.kind == "bool":
                    return self._error(e.span, "E202", "cannot negate a comparison")
                return Node("neg", [arg], arg.type, arg.stage, e.span)
            case ast.Transpose():
                arg = self.expr(e.operand, where)
                if arg.type is ERROR:
                    return arg
                if not arg.type.is_matrix or arg.type.token:
                    return self._error(e.span, "E202", f".T takes a matrix, not {arg.type}", "vectors are columns")
                t = Type("tensor", (arg.type.shape[1], arg.type.shape[0]), diag=arg.type.diag)
                return Node("T", [arg], t, arg.stage, e.span)
            case ast.BinOp():
                left, right = self.expr(e.left, where), self.expr(e.right, where)
                if ERROR in (left.type, right.type):
                    return Node(e.op, [left, right], ERROR, max(left.stage, right.stage), e.span)
                t = self._binop_type(e.op, left, right, e.span)
                return Node(e.op, [left, right], t, max(left.stage, right.stage), e.span)
        raise AssertionError(e)

    def _error(self, span: Span, code: str, message: str, hint: str | None = None) -> Node:
        self.report.error(span, code, message, hint)
        return Node("error", [], ERROR, CONST, span)

    def _num(self, e: ast.Num) -> Node:
        value = float(e.text)
        if not math.isfinite(value) or abs(value) > 1e300:
            return self._error(e.span, "E203", f"number {e.text[:20]} is out of range")
        return Node("num", [], INT if e.is_int else FLOAT, CONST, e.span, value=e.text)

    def _name(self, e: ast.Name, where: str) -> Node:
        binding = self.env.get(e.id)
        if binding is None:
            if e.id in builtins.FILLS:
                return self._error(e.span, "E301", f"{e.id} only initialises a param: `param P[...] = {e.id}`")
            close = difflib.get_close_matches(e.id, list(self.env), n=1)
            return self._error(
                e.span, "E101", f"unknown name {e.id!r}", f"did you mean {close[0]!r}?" if close else None
            )
        if binding.type is ERROR:
            binding.used = True
            return Node("error", [], ERROR, binding.stage, e.span)
        if where in ("hyper", "dim", "require") and binding.stage > CONST:
            return self._error(e.span, "E301", f"{e.id} is {STAGE_NAMES[binding.stage]}; a {where} needs constants")
        if where == "hyper" and binding.kind == "dim":
            return self._error(e.span, "E301", f"a hyper's default cannot read {e.id}", "use a require line")
        if e.id == "y":
            self.y_uses.append(e.span)
        binding.used = True
        return Node("ref", [], binding.type, binding.stage, e.span, value=e.id, ref_kind=binding.kind)

    def _call(self, e: ast.Call, where: str) -> Node:
        if e.fn in builtins.FILLS:
            return self._error(e.span, "E301", f"{e.fn} only initialises a param: `param P[...] = {e.fn}`")
        if e.fn not in builtins.NAMES:
            for arg in e.args:  # still check the arguments: their errors count, and the names they read are used
                self.expr(arg, where)
            close = difflib.get_close_matches(e.fn, sorted(builtins.NAMES), n=1)
            return self._error(
                e.span, "E101", f"unknown function {e.fn!r}", f"did you mean {close[0]!r}?" if close else None
            )
        args = [self.expr(a, where) for a in e.args]
        if len(args) != builtins.ARITY[e.fn]:
            return self._error(e.span, "E202", f"{e.fn}() takes {builtins.ARITY[e.fn]} arguments, not {len(args)}")
        stage = max((a.stage for a in args), default=CONST)
        if any(a.type is ERROR for a in args):
            return Node("call", args, ERROR, stage, e.span, value=e.fn)
        result = builtins.result_type(e.fn, [a.type for a in args], [a.stage for a in args])
        if isinstance(result, str):
            return self._error(e.span, "E202", result)
        if e.fn in builtins.DIM_ARGUMENT:
            arg = args[builtins.DIM_ARGUMENT[e.fn]]
            dim = self.dim_of(arg)
            if dim is None:
                return self._error(
                    arg.span, "E202", f"{e.fn}() needs a dimension here (int hypers, d_in, d_out, integers)"
                )
            if result.kind == "tuple":
                result = Type("tuple", items=tuple(builtins.substitute_rank(t, dim) for t in result.items))
            else:
                result = builtins.substitute_rank(result, dim)
            if e.fn == "offdiag" and args[0].type.shape[0] != dim * dim - dim:
                return self._error(
                    args[0].span, "E201", f"offdiag(v, {dim}) needs v of length {dim * dim - dim}, not {args[0].type}"
                )
        if e.fn in builtins.INIT_TIME:
            stage = max(stage, INIT)
        return Node("call", args, result, stage, e.span, value=e.fn)

    def _binop_type(self, op: str, left: Node, right: Node, span: Span) -> Type:
        a, b = left.type, right.type
        if a.kind == "tuple" or b.kind == "tuple":
            return self._error(span, "E202", "unpack svd() with `let U, S, Vt = svd(...)` first").type
        if op in ("==", "!=", "<", "<=", ">", ">="):
            if not (a.is_python and b.is_python):
                return self._error(span, "E202", "comparisons take constants").type
            return BOOL
        if a.kind == "bool" or b.kind == "bool":
            return self._error(span, "E202", f"cannot use a comparison with {op}").type
        if op in ("//", "%"):
            if a.kind != "int" or b.kind != "int":
                return self._error(span, "E202", f"{op} takes two ints").type
            return INT
        if op == "**":
            if not b.is_python or a.diag:
                return self._error(span, "E202", "the exponent must be a constant").type
            return FLOAT if a.is_python else a
        if op == "@":
            return self._matmul_type(a, b, span)
        if a.is_python and b.is_python:
            return FLOAT if "float" in (a.kind, b.kind) or op == "/" else INT
        if a.diag or b.diag:
            if op in ("*", "/") and (a.is_scalar or b.is_scalar) and not (op == "/" and b.diag):
                return a if a.diag else b
            return self._error(span, "E202", "diag(v) only appears in @ chains", "write v * ... for a gate").type
        if a.operator or b.operator:
            return self._error(span, "E202", "householder(U) only appears as `householder(U) @ h`").type
        if a.is_scalar and not a.token:
            return Type("tensor", b.shape, token=b.token) if not b.is_python else a
        if b.is_scalar and not b.token:
            return Type("tensor", a.shape, token=a.token)
        if a.is_scalar or b.is_scalar:  # one scalar per token, against a vector
            other = b if a.is_scalar else a
            if len(other.shape) > 1:
                return self._error(span, "E202", "a per-token scalar combines with vectors, not matrices").type
            return Type("tensor", other.shape, token=True)
        if a.shape != b.shape:
            hint = None
            if op == "*" and {len(a.shape), len(b.shape)} == {1, 2}:
                hint = "to scale rows write diag(v) @ M; to scale columns, M @ diag(v)"
            return self._error(span, "E201", f"cannot combine {a} and {b} with {op}", hint).type
        if (a.token or b.token) and len(a.shape) > 1:
            return self._error(span, "E202", "per-token values are vectors").type
        return Type("tensor", a.shape, token=a.token or b.token)

    def _matmul_type(self, a: Type, b: Type, span: Span) -> Type:
        if a.is_scalar or b.is_scalar:
            return self._error(span, "E202", "@ multiplies matrices and vectors; scale with *").type
        if a.token:
            return self._error(span, "E202", f"the left side of @ is {a}", "write M @ x: vectors are columns").type
        if len(a.shape) != 2:
            return self._error(span, "E202", f"the left side of @ must be a matrix, not {a}").type
        if a.shape[1] != b.shape[0]:
            return self._error(span, "E201", f"cannot multiply {a} @ {b}: {a.shape[1]} != {b.shape[0]}").type
        if b.operator or (a.operator and not b.token):
            return self._error(
                span, "E202", "householder(U) applies to per-token vectors only", "write householder(U) @ (... @ x)"
            ).type
        if len(b.shape) == 1:
            return Type("tensor", (a.shape[0],), token=b.token)
        if b.token:
            return self._error(span, "E202", "per-token values are vectors").type
        return Type("tensor", (a.shape[0], b.shape[1]), diag=a.diag and b.diag)


def flatten_chain(node: Node) -> tuple[list[tuple[str, Node]], list[Node]]:
    """Split a product into scalar coefficients and the factors of its @ chain.

    `alpha / r * B @ A @ x` -> ([("*", alpha / r)], [B, A, x]). A node that is not
    an @ chain gives ([], [node]).
    """
    if not _has_chain(node):
        return [], [node]
    coefs: list[tuple[str, Node]] = []
    factors: list[Node] = []

    def walk(n: Node) -> None:
        left, right = n.args if len(n.args) == 2 else (None, None)
        if n.op == "@":
            walk(left)
            walk(right)
        elif n.op == "*" and _is_coef(left):
            coefs.append(("*", left))
            walk(right)
        elif n.op in ("*", "/") and _is_coef(right):
            walk(left)
            coefs.append((n.op, right))
        else:
            factors.append(n)

    walk(node)
    return coefs, factors


def _is_coef(node: Node) -> bool:
    return node.type.is_scalar and not node.type.token


def _has_chain(node: Node) -> bool:
    return node.op == "@" or (
        node.op in ("*", "/") and any(_is_coef(a) for a in node.args) and any(_has_chain(a) for a in node.args)
    )


class _Stager:
    """Decides what is computed at init and what in the hook.

    Init-time lets the forward or the residual reads become frozen buffers. An
    init-time subexpression inside the forward (say `colnorm(W)`) is hoisted
    into a buffer of its own, so the hook never recomputes it and never reads W
    for it. `@` chains are hoisted factor by factor: a low-rank chain is never
    collapsed into a dense matrix.
    """

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.program = checker.program
        self.buffer_names: list[str] = []

    def run(self) -> None:
        program = self.program
        forward_lets = [let for let in program.lets if let.stage == FORWARD]
        for let in forward_lets:
            let.value = self.hoist(let.value)
        program.forward = self.hoist(program.forward)
        forward_roots = [program.forward] + [let.value for let in forward_lets]
        init_roots = [let.value for let in program.lets if let.stage == INIT]
        init_roots += [p.init for p in program.params]
        init_roots += [b.value for b in program.buffers if b.value is not None]
        read = _refs(forward_roots) | _refs([program.residual] if program.residual else [])
        for let in program.lets:
            for name, t in zip(let.names, let.types, strict=True):
                if name in read and let.stage == INIT and t is not ERROR:
                    program.buffers.append(BufferInfo(name, t.shape, let.line))
        program.buffers.sort(key=lambda b: (b.line, b.value is not None))
        for node in _nodes(forward_roots + ([program.residual] if program.residual else [])):
            if node.op == "ref" and node.ref_kind == "stat":
                self.checker.report.error(
                    node.span,
                    "E301",
                    f"the statistic {node.value} is read at init only",
                    "compute what the forward needs from it with a `let`",
                )
        program.forward_reads_weight = "W" in _refs(forward_roots)
        program.init_reads_weight = "W" in _refs(init_roots) or (
            program.residual is not None and "W" in _refs([program.residual])
        )
        if program.residual is not None and program.forward_reads_weight:
            self.checker.report.error(
                program.forward.span,
                "E305",
                "the forward reads W and the spec has a residual",
                "after a residual the layer holds W_res: read the original W through an init-time `let`",
            )

    def hoist(self, node: Node) -> Node:
        if node.op == "@" or (node.op in ("*", "/") and _has_chain(node)):
            node.args = [self.hoist(a) for a in node.args]
            return node
        if node.stage != INIT or node.op in ("ref", "num") or node.type is ERROR:
            node.args = [self.hoist(a) for a in node.args]
            return node
        if node.op == "T" and node.args[0].op == "ref":
            return node
        if node.op == "call" and node.value == "diag":
            node.args = [self.hoist(a) for a in node.args]
            return node
        name = self._name_for(node)
        self.program.buffers.append(BufferInfo(name, node.type.shape, node.span.line, value=node))
        return Node("ref", [], node.type, INIT, node.span, value=name, ref_kind="buffer")

    def _name_for(self, node: Node) -> str:
        if node.op == "call" and len(node.args) == 1 and node.args[0].op == "ref":
            base = f"{node.value}_{node.args[0].value}"
        else:
            base = "frozen"
        name, n = base, 1
        while name in self.checker.env or name in self.buffer_names:
            n += 1
            name = f"{base}{n}"
        self.buffer_names.append(name)
        return name


def fold(node: Node, values: dict[str, int | float]) -> int | float | bool | None:
    """The value of a constant expression at the defaults, as the generated Python computes it.

    None when it depends on something unknown here (d_in, d_out) or grows past MAX_CONSTANT;
    arithmetic that fails (division by zero, overflow, sqrt of a negative) raises, and so does an
    int exponent above MAX_EXPONENT, whatever the base.
    """
    if node.op == "num":
        return int(node.value) if node.type.kind == "int" else float(node.value)
    if node.op == "ref":
        return values.get(node.value)
    args = [fold(a, values) for a in node.args]
    if node.op == "**" and isinstance(args[1], int) and not isinstance(args[1], bool) and args[1] > MAX_EXPONENT:
        raise OverflowError(f"an int power's exponent is at most {MAX_EXPONENT}, not {args[1]}")
    if any(a is None for a in args):
        return None
    if node.op == "neg":
        result = -args[0]
    elif node.op == "call":
        fns = {"min": min, "max": max, "abs": abs, "sqrt": math.sqrt, "exp": math.exp}
        if node.value not in fns:
            return None
        result = fns[node.value](*args)
    else:
        a, b = args
        result = _BINARY[node.op](a, b)
    if isinstance(result, int) and not isinstance(result, bool) and abs(result) > MAX_CONSTANT:
        return None
    return result


_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "**": lambda a, b: a**b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _nodes(roots: list[Node]) -> list[Node]:
    found, stack = [], list(roots)
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.args)
    return found


def _refs(roots: list[Node]) -> set[str]:
    found: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.op == "ref":
            found.add(node.value)
        stack.extend(node.args)
    return found


def check(spec: ast.Spec, source: str, file: str) -> Program:
    return Checker(spec, source, file).run()
