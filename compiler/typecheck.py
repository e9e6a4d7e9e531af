"""Pass: AST -> typed Program.

Resolves every name, types every expression (shapes are symbolic Dims) and gives it a stage
(constant, init-time or forward-time), collecting every error in the spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, replace

from . import ast, builtins
from .diagnostics import Reporter, Span
from .dims import FUNCTIONS, Dim, Facts, dim_function
from .ir import (
    COMPARISONS,
    Declared,
    HyperInfo,
    LetInfo,
    Node,
    Op,
    ParamInfo,
    Program,
    RefKind,
    RequireInfo,
    StatInfo,
    error_node,
)
from .names import MODULE_NAMES, RESERVED, class_name
from .types import BOOL, CONST, ERROR, FLOAT, FORWARD, INIT, INT, STAGE_NAMES, Stage, Type, tensor

D_IN, D_OUT = Dim.of("d_in"), Dim.of("d_out")
# The largest d_in and d_out over the targets of one attach: only a shared tensor's dims read them.
MAX_DIMS = {"max_d_in": "d_in", "max_d_out": "d_out"}
HYPER_TYPES = {"int": INT, "float": FLOAT}


@dataclass
class Binding:
    """The checker's own record of a name while it walks the spec (the Program it returns is frozen)."""

    kind: RefKind
    type: Type
    stage: Stage
    span: Span | None = None
    dim: Dim | None = None  # for int constants usable in shapes
    used: bool = False


class Checker:
    def __init__(self, spec: ast.Spec, source: str, file: str) -> None:
        self.spec = spec
        self.report = Reporter(file, source)
        self.source, self.file = source, file
        self.env: dict[str, Binding] = {
            "d_in": Binding(RefKind.DIM, INT, CONST, dim=D_IN, used=True),
            "d_out": Binding(RefKind.DIM, INT, CONST, dim=D_OUT, used=True),
            "x": Binding(RefKind.INPUT, tensor(D_IN, token=True), FORWARD, used=True),
            "y": Binding(RefKind.INPUT, tensor(D_OUT, token=True), FORWARD, used=True),
            "W": Binding(RefKind.INPUT, tensor(D_OUT, D_IN), INIT, used=True),
            "bias": Binding(RefKind.INPUT, tensor(D_OUT), FORWARD, used=True),
            **{name: Binding(RefKind.DIM, INT, CONST, dim=Dim.of(name), used=True) for name in MAX_DIMS},
        }
        self.shared_dims = False  # while the dims of a `shared` tensor are read: max_d_in, max_d_out allowed
        self.facts: Facts = frozenset()  # inside a conditional's branch: what its test says (d_in <= d_out)
        self.form = ""  # inside a conditional's branch: which one, for the errors in it ("not (d_in <= d_out)")
        self.y_uses: list[Span] = []
        self.forward_span: Span | None = None
        self.hypers: list[HyperInfo] = []
        self.lets: list[LetInfo] = []
        self.params: list[ParamInfo] = []
        self.stats: list[StatInfo] = []
        self.requires: list[RequireInfo] = []
        self.seeded: list[Span] = []  # random fills of frozen tensors: they read `hyper seed: int`
        self.constants: list[tuple[str, Node]] = []  # names with a constant value, for the fold pass
        self.residual: Node | None = None
        self.residual_line = 0
        self.forward: Node | None = None
        self.forward_line = 0
        self.site = ""
        self.target: str | None = None

    # ----------------------------------------------------------------- statements

    def run(self) -> Program:
        if self.spec.name in RESERVED or not self.spec.name.isidentifier() or self.spec.name.startswith("_"):
            self.report.error(self.spec.span, "E103", f"{self.spec.name!r} cannot name a variant")
        cls = class_name(self.spec.title, self.spec.name)
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
        bound = [(name, b) for name, b in self.env.items() if b.span is not None]  # not d_in, x, ...
        declared = tuple(Declared(name, b.kind, b.span, b.used, b.type is ERROR) for name, b in bound)
        return Program(
            name=self.spec.name,
            title=self.spec.title,
            url=self.spec.url,
            doc=self.spec.doc,
            source=self.source,
            file=self.file,
            hypers=tuple(self.hypers),
            lets=tuple(self.lets),
            params=tuple(self.params),
            stats=tuple(self.stats),
            requires=tuple(self.requires),
            residual=self.residual,
            residual_line=self.residual_line,
            site=self.site,
            forward=self.forward,
            forward_line=self.forward_line,
            target=self.target,
            declared=declared,
            constants=tuple(self.constants),
            problems=tuple(self.report.diagnostics),
        )

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
        if self.bind(s.name, s.span, Binding(RefKind.HYPER, declared or ERROR, CONST, s.span)):
            if declared is INT:
                self.env[s.name].dim = Dim.of(s.name)
            self.hypers.append(HyperInfo(s.name, s.type, default, s.span.line))
            if default.type is not ERROR and default.stage == CONST:
                self.constants.append((s.name, default))

    def _param(self, s: ast.Param) -> None:
        self.shared_dims = s.shared
        shape = tuple(d for d in (self.dim(e) for e in s.dims) if d is not None)
        self.shared_dims = False
        declared = tensor(*shape) if len(shape) == len(s.dims) else ERROR  # a bad dim was reported already
        what = "param" if s.trainable else "frozen"
        if s.shared:
            self._shared(s, shape)
        if (
            isinstance(s.init, (ast.Name, ast.Call))
            and getattr(s.init, "id", getattr(s.init, "fn", "")) in builtins.FILLS
        ):
            init = self._fill(s.init, declared)
            if init.value in builtins.INDEX_FILLS and init.type is not ERROR:
                declared = self._index_set(s, init, declared)
                init = Node(Op.CALL, init.args, declared, init.stage, init.span, value=init.value)
            if not s.trainable and init.value in builtins.RANDOM_FILLS:
                self.seeded.append(s.init.span)
        else:
            init = self.expr(s.init, "param")
            if init.type is not ERROR and len(shape) == len(s.dims):
                if init.stage > INIT:
                    self.report.error(
                        init.span,
                        "E301",
                        f"the init of {what} {s.name} is {STAGE_NAMES[init.stage]}",
                        f"a {what if s.trainable else 'frozen tensor'}'s init may read W, hypers and init-time lets, "
                        "not params, x or y",
                    )
                elif init.type.integer:
                    self.report.error(
                        init.span,
                        "E202",
                        f"the init of {what} {s.name} is an index set, which only {builtins.INDEX_READERS_TEXT} read",
                    )
                elif not (init.type.is_scalar or (init.type.shape == shape and not init.type.diag)):
                    self.report.error(init.span, "E201", f"{what} {s.name} is {declared} but its init is {init.type}")
        kind = RefKind.PARAM if s.trainable else RefKind.FROZEN
        if s.shared and init.type is not ERROR and init.stage > CONST:
            self.report.error(
                init.span,
                "E307",
                f"the init of shared {what} {s.name} reads a layer",
                "one tensor serves every target: init it with a fill or a constant",
            )
        if self.bind(s.name, s.span, Binding(kind, declared, FORWARD, s.span)):
            self.params.append(ParamInfo(s.name, shape, init, s.span.line, s.trainable, s.shared))

    def _shared(self, s: ast.Param, shape: tuple[Dim, ...]) -> None:
        """A shared tensor's dims are the same for every target: no d_in, d_out (max_d_in, max_d_out instead)."""
        for e, d in zip(s.dims, shape, strict=False):
            if {"d_in", "d_out"} & _atoms(d):
                self.report.error(
                    e.span,
                    "E307",
                    f"shared {'param' if s.trainable else 'frozen'} {s.name} has a dim that differs between layers",
                    "size it by max_d_in or max_d_out (the largest over the targets) and slice it with "
                    "rows(M, n) or cols(M, n)",
                )

    def _index_set(self, s: ast.Param, init: Node, declared: Type) -> Type:
        """The type of a tensor an index fill (randperm) initialises: an integer vector, never trained."""
        if s.trainable:
            self.report.error(
                s.init.span,
                "E202",
                f"{init.value} draws indices, which are never trained",
                f"write `frozen {s.name}[k] = {builtins.fill_form(init.value)}`",
            )
            return ERROR
        if len(declared.shape) != 1:
            self.report.error(s.init.span, "E202", f"{init.value} fills a vector [k], not {declared}")
            return ERROR
        if any(a.type.kind != "int" for a in init.args if a.type is not ERROR):
            self.report.error(s.init.span, "E202", f"{init.value}(n) takes an int n, the range of the indices")
            return ERROR
        return Type("tensor", declared.shape, integer=True)

    def _fill(self, e: ast.Name | ast.Call, declared: Type) -> Node:
        """A fill as a param's or frozen tensor's whole init: `zeros`, or `normal(std)` with constant arguments."""
        fn = e.id if isinstance(e, ast.Name) else e.fn
        wanted = builtins.FILL_ARGS.get(fn, ())
        given = () if isinstance(e, ast.Name) else e.args
        if isinstance(e, ast.Call) and not wanted:
            return self._error(e.span, "E202", f"{fn} takes no arguments: write `= {fn}`")
        if len(given) != len(wanted):
            return self._error(
                e.span,
                "E202",
                f"{fn} takes {len(wanted)} argument{'s' if len(wanted) > 1 else ''}, not {len(given)}: "
                f"write {builtins.fill_form(fn)}",
            )
        args = tuple(self.expr(a, "fill") for a in given)
        for arg in args:
            if arg.type is not ERROR and (arg.stage > CONST or not arg.type.is_python or arg.type.kind == "bool"):
                self._error(arg.span, "E202", f"the arguments of {fn}() are constants (hypers, numbers)")
        return Node(Op.CALL, args, declared, CONST, e.span, value=fn)

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
            binding = Binding(RefKind.LET, t, value.stage, s.span)
            if t.kind == "int" and value.stage == CONST:
                binding.dim = self.dim_of(value)
            if self.bind(name, s.span, binding) and t.is_python and value.stage == CONST:
                self.constants.append((name, value))
        self.lets.append(LetInfo(s.names, value, types, value.stage, s.span.line))

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
        if self.bind(s.name, s.span, Binding(RefKind.STAT, t, INIT, s.span)):
            self.stats.append(StatInfo(s.name, fn, s.span.line))

    def _require(self, s: ast.Require) -> None:
        cond = self.expr(s.cond, "require")
        if cond.type is not ERROR and (cond.type.kind != "bool" or cond.stage > CONST):
            self.report.error(
                cond.span, "E202", "require takes a comparison of constants (hypers, d_in, d_out, numbers)"
            )
        self.requires.append(RequireInfo(cond, s.message, s.span.line))

    def _residual(self, s: ast.Residual) -> None:
        if self.residual is not None:
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
        self.residual, self.residual_line = value, s.span.line

    def _target(self, s: ast.Target) -> None:
        if self.target is not None:
            self.report.error(s.span, "E102", "a spec has at most one target line")
        try:
            re.compile(s.pattern)
        except re.error as exc:
            self.report.error(s.span, "E202", f"the target is not a valid regex: {exc}")
        self.target = s.pattern

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
        self.site, self.forward, self.forward_line = s.site, value, s.span.line

    def _finish(self) -> None:
        seed = self.env.get("seed")
        if self.seeded and (seed is None or seed.kind is not RefKind.HYPER or seed.type is not INT):
            self.report.error(
                self.seeded[0],
                "E306",
                "a random fill of a frozen tensor is seeded by the hyper `seed`, which the spec does not declare",
                "add `hyper seed: int = 0`",
            )
        if self.forward_span is None:
            self.report.error(
                self.spec.span, "E302", "the spec has no forward rule", "add `output <expr>` or `input <expr>`"
            )
        elif self.site == "input":
            for span in self.y_uses:
                self.report.error(span, "E301", "y is the layer output: an `input` rule runs before the layer")

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
                node.span,
                "E202",
                "a dimension is built from int hypers, d_in, d_out and integers with + - *, //, min, max and ceil_div; "
                "the divisor of // and ceil_div is an int hyper, a product of them or a positive integer, not a sum "
                "(make a sum such as `r + 1` a hyper of its own)",
            )
        elif result.constant is not None and result.constant < 1:
            self.report.error(node.span, "E202", f"a dimension is at least 1, not {result.constant}")
            return None
        return result

    def dim_of(self, node: Node) -> Dim | None:
        if node.op is Op.NUM:
            return Dim.const(int(node.value))
        if node.op is Op.REF:
            return self.env[node.value].dim
        if node.op in (Op.ADD, Op.SUB, Op.MUL):
            left, right = (self.dim_of(a) for a in node.args)
            if left is None or right is None:
                return None
            return left + right if node.op is Op.ADD else left - right if node.op is Op.SUB else left * right
        if node.op is Op.FLOORDIV:
            left, right = (self.dim_of(a) for a in node.args)
            if left is None or right is None or len(right.terms) != 1 or right.terms[0][1] < 1:
                return None  # a divisor is one term: an int hyper, a product of them, a positive integer
            return left // right
        if node.op is Op.CALL and node.value in ("min", "max", "ceil_div") and len(node.args) == 2:
            left, right = (self.dim_of(a) for a in node.args)
            if left is None or right is None:
                return None
            if node.value == "ceil_div" and (len(right.terms) != 1 or right.terms[0][1] < 1):
                return None  # the divisor of `//`
            return dim_function(node.value, left, right)
        return None

    def expr(self, e: ast.Expr, where: str) -> Node:
        """The typed node of `e`; inside a conditional's branch its shape is simplified by the branch's facts."""
        node = self._expr(e, where)
        if self.facts and node.type.kind == "tensor":
            shape = tuple(d.assume(self.facts) for d in node.type.shape)
            node = replace(node, type=dataclasses.replace(node.type, shape=shape))
        return node

    def _cond(self, e: ast.Cond, where: str) -> Node:
        """`then if test else other`: the test compares two dims; each branch is typed knowing the test's
        outcome (given d_in <= d_out, min(d_in, d_out) is d_in), and both must give one type."""
        test = self.expr(e.test, where)
        sides = [self.dim_of(a) for a in test.args] if test.op in COMPARISONS else [None]
        if test.type is not ERROR and None in sides:
            self._error(
                test.span,
                "E202",
                "a conditional's test compares two dims (d_in, d_out, int hypers): `A if d_in <= d_out else B`",
            )
        known: tuple[Facts, Facts] = (frozenset(), frozenset())
        if test.type is not ERROR and None not in sides:
            a, b = (d.assume(self.facts) for d in sides)
            known = {
                Op.LE: ({(a, b)}, {(b, a)}),
                Op.LT: ({(a, b)}, {(b, a)}),
                Op.GE: ({(b, a)}, {(a, b)}),
                Op.GT: ({(b, a)}, {(a, b)}),
                Op.EQ: ({(a, b), (b, a)}, set()),
                Op.NE: (set(), {(a, b), (b, a)}),
            }[test.op]
        outer, outer_form, branches = self.facts, self.form, []
        shown = source_of(self.source, test) if test.type is not ERROR else ""
        for branch, facts, form in zip((e.then, e.other), known, (shown, f"not ({shown})"), strict=True):
            self.facts = outer | frozenset(facts)
            self.form = form if facts else outer_form
            branches.append(self.expr(branch, where))
        self.facts, self.form = outer, outer_form
        then, other = branches
        stage = max(test.stage, then.stage, other.stage)
        if ERROR in (test.type, then.type, other.type):
            return Node(Op.IF, (test, then, other), ERROR, stage, e.span)
        for branch in (then, other):
            if branch.type.kind != "tensor" or branch.type.diag or branch.type.operator or branch.type.integer:
                return self._error(branch.span, "E202", f"a conditional chooses between two tensors, not {branch.type}")
        if then.type != other.type:
            return self._error(
                e.span,
                "E201",
                f"the two forms of this conditional differ: {then.type} if {source_of(self.source, test)}, "
                f"{other.type} otherwise",
                "each form is typed knowing its test's outcome: they must give the same shape",
            )
        return Node(Op.IF, (test, then, other), then.type, stage, e.span)

    def _expr(self, e: ast.Expr, where: str) -> Node:
        match e:
            case ast.Cond():
                return self._cond(e, where)
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
                if arg.type.integer:
                    return self._error(
                        e.span, "E202", f"{arg.type} holds indices: only {builtins.INDEX_READERS_TEXT} read it"
                    )
                return Node(Op.NEG, (arg,), arg.type, arg.stage, e.span)
            case ast.Transpose():
                arg = self.expr(e.operand, where)
                if arg.type is ERROR:
                    return arg
                if len(arg.type.shape) > 2 and arg.type.kind == "tensor" and not arg.type.token:  # a stack: each
                    t = Type("tensor", (*arg.type.shape[:-2], arg.type.shape[-1], arg.type.shape[-2]))
                    return Node(Op.T, (arg,), t, arg.stage, e.span)
                if not arg.type.is_matrix or arg.type.token or arg.type.integer:
                    return self._error(e.span, "E202", f".T takes a matrix, not {arg.type}", "vectors are columns")
                operator = arg.type.operator
                operator = operator.removesuffix("_T") if operator.endswith("_T") else operator + "_T" * bool(operator)
                t = Type("tensor", (arg.type.shape[1], arg.type.shape[0]), diag=arg.type.diag, operator=operator)
                return Node(Op.T, (arg,), t, arg.stage, e.span)
            case ast.BinOp():
                left, right = self.expr(e.left, where), self.expr(e.right, where)
                if ERROR in (left.type, right.type):
                    return Node(Op(e.op), (left, right), ERROR, max(left.stage, right.stage), e.span)
                t = self._binop_type(Op(e.op), left, right, e.span)
                stage = max(left.stage, right.stage)
                if e.op == "@" and left.op in (Op.MUL, Op.DIV) and left.type.operator and t is not ERROR:
                    # (s * op(...)) @ h is s * (op(...) @ h): an operator is applied, a coefficient scales it
                    first, second = left.args
                    coef, matrix = (second, first) if first.type.operator else (first, second)
                    inner = Node(Op.MATMUL, (matrix, right), t, max(matrix.stage, right.stage), e.span)
                    args = (coef, inner) if coef is first else (inner, coef)
                    return Node(left.op, args, t, stage, e.span)
                return Node(Op(e.op), (left, right), t, stage, e.span)
        raise AssertionError(e)

    def _error(self, span: Span, code: str, message: str, hint: str | None = None) -> Node:
        if self.form:  # in a conditional's form the shapes are those its test implies: say which form
            hint = f"{hint}; " if hint else ""
            hint += f"this is the form for {self.form}: its shapes are resolved under that test"
        self.report.error(span, code, message, hint)
        return error_node(span)

    def _num(self, e: ast.Num) -> Node:
        value = float(e.text)
        if not math.isfinite(value) or abs(value) > 1e300:
            return self._error(e.span, "E203", f"number {e.text[:20]} is out of range")
        return Node(Op.NUM, (), INT if e.is_int else FLOAT, CONST, e.span, value=e.text)

    def _name(self, e: ast.Name, where: str) -> Node:
        binding = self.env.get(e.id)
        if binding is None:
            if e.id in builtins.FILLS:
                return self._error(
                    e.span,
                    "E301",
                    f"{e.id} only initialises a param or frozen tensor: `param P[...] = {builtins.fill_form(e.id)}`",
                )
            close = difflib.get_close_matches(e.id, [*self.env, *builtins.FILLS], n=1)  # (`kaimng`: kaiming)
            return self._error(
                e.span, "E101", f"unknown name {e.id!r}", f"did you mean {close[0]!r}?" if close else None
            )
        if binding.type is ERROR:
            binding.used = True
            return Node(Op.ERROR, (), ERROR, binding.stage, e.span)
        if where in ("hyper", "dim", "require") and binding.stage > CONST:
            return self._error(e.span, "E301", f"{e.id} is {STAGE_NAMES[binding.stage]}; a {where} needs constants")
        if e.id in MAX_DIMS and not self.shared_dims:
            return self._error(
                e.span,
                "E307",
                f"{e.id} sizes shared tensors only",
                f"a layer's own size is {MAX_DIMS[e.id]}",
            )
        if where == "hyper" and binding.kind is RefKind.DIM:
            return self._error(e.span, "E301", f"a hyper's default cannot read {e.id}", "use a require line")
        if e.id == "y":
            self.y_uses.append(e.span)
        binding.used = True
        return Node(Op.REF, (), binding.type, binding.stage, e.span, value=e.id, ref_kind=binding.kind)

    def _call(self, e: ast.Call, where: str) -> Node:
        if e.fn in builtins.FILLS:
            return self._error(
                e.span,
                "E301",
                f"{e.fn} only initialises a param or frozen tensor: `param P[...] = {builtins.fill_form(e.fn)}`",
            )
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
            return Node(Op.CALL, tuple(args), ERROR, stage, e.span, value=e.fn)
        if e.fn not in builtins.INDEX_READERS and any(a.type.integer for a in args):
            return self._error(
                e.span, "E202", f"{e.fn}() cannot read an index set: only {builtins.INDEX_READERS_TEXT} read one"
            )
        result = builtins.result_type(e.fn, [a.type for a in args], [a.stage for a in args])
        if isinstance(result, str):
            return self._error(e.span, "E202", result)
        if e.fn == "scatter":
            dims = [self.dim_of(a) for a in args[2:]]
            if None in dims:
                return self._error(
                    e.span, "E202", "scatter() needs dimensions m, n (int hypers, d_in, d_out, integers)"
                )
            result = Type("tensor", tuple(dims))
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
            if e.fn in ("rows", "cols"):
                axis = 0 if e.fn == "rows" else -1
                size = args[0].type.shape[axis]
                if not _fits(dim, size, self.facts):
                    return self._error(
                        args[1].span,
                        "E201",
                        f"{e.fn}({args[0].type}, {dim}) takes at most {size}, and {dim} <= {size} need not hold",
                        "slice a shared tensor sized max_d_in (max_d_out) to d_in (d_out)",
                    )
            packed = (dim * dim - dim) // Dim.const(2)
            if e.fn == "skew" and args[0].type.shape[-1] != packed:
                return self._error(
                    args[0].span, "E201", f"skew(v, {dim}) needs rows of length {packed}, not {args[0].type}"
                )
        if e.fn in builtins.COLS_ARGUMENT:
            arg = args[builtins.COLS_ARGUMENT[e.fn]]
            cols = self.dim_of(arg)
            if cols is None:
                return self._error(
                    arg.span, "E202", f"{e.fn}() needs a dimension here (int hypers, d_in, d_out, integers)"
                )
            result = builtins.substitute_cols(result, cols)
        if e.fn in builtins.INIT_TIME:
            stage = max(stage, INIT)
        return Node(Op.CALL, tuple(args), result, stage, e.span, value=e.fn)

    def _binop_type(self, op: Op, left: Node, right: Node, span: Span) -> Type:
        a, b = left.type, right.type
        if a.kind == "tuple" or b.kind == "tuple":
            return self._error(span, "E202", "unpack svd() with `let U, S, Vt = svd(...)` first").type
        if op in COMPARISONS:
            if not (a.is_python and b.is_python):
                return self._error(span, "E202", "comparisons take constants").type
            return BOOL
        if a.kind == "bool" or b.kind == "bool":
            return self._error(span, "E202", f"cannot use a comparison with {op}").type
        if a.integer or b.integer:
            return self._error(
                span, "E202", f"{a if a.integer else b} holds indices: only {builtins.INDEX_READERS_TEXT} read it"
            ).type
        if op in (Op.FLOORDIV, Op.MOD):
            if a.kind != "int" or b.kind != "int":
                return self._error(span, "E202", f"{op} takes two ints").type
            return INT
        if op is Op.POW:
            if not b.is_python or a.diag:
                return self._error(span, "E202", "the exponent must be a constant").type
            if a.kind == "int" and b.kind == "int":  # 2 ** (k - 1) in a require: Python's int power
                return INT
            return FLOAT if a.is_python else a
        if op is Op.MATMUL:
            return self._matmul_type(a, b, span)
        if a.is_python and b.is_python:
            return FLOAT if "float" in (a.kind, b.kind) or op is Op.DIV else INT
        if a.diag or b.diag:
            if op in (Op.MUL, Op.DIV) and (a.is_scalar or b.is_scalar) and not (op is Op.DIV and b.diag):
                return a if a.diag else b
            return self._error(span, "E202", "diag(v) only appears in @ chains", "write v * ... for a gate").type
        if a.operator or b.operator:
            scalar = b if a.operator else a
            if op in (Op.MUL, Op.DIV) and scalar.is_scalar and not scalar.token and not (op is Op.DIV and b.operator):
                return a if a.operator else b  # `s * blockdiag(R) @ x`: the chain takes s as a coefficient
            name = (a.operator or b.operator).removesuffix("_T")
            return self._error(span, "E202", f"{name}(...) only appears as `{name}(...) @ h`").type
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
            if op is Op.MUL and {len(a.shape), len(b.shape)} == {1, 2}:
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
            hint = (
                "to scale by a vector v inside a chain, write diag(v): B @ diag(v) @ A" if len(a.shape) == 1 else None
            )
            return self._error(span, "E202", f"the left side of @ must be a matrix, not {a}", hint).type
        if a.shape[1] != b.shape[0]:
            return self._error(span, "E201", f"cannot multiply {a} @ {b}: {a.shape[1]} != {b.shape[0]}").type
        if b.operator or (a.operator and not b.token):
            name = (a.operator or b.operator).removesuffix("_T")
            return self._error(
                span, "E202", f"{name}(...) applies to per-token vectors only", f"write {name}(...) @ (... @ x)"
            ).type
        if len(b.shape) == 1:
            return Type("tensor", (a.shape[0],), token=b.token)
        if b.token:
            return self._error(span, "E202", "per-token values are vectors").type
        return Type("tensor", (a.shape[0], b.shape[1]), diag=a.diag and b.diag)


def _atoms(d: Dim) -> set[str]:
    """The atoms of a dim, and the atoms of the numerators of its quotient atoms."""
    from .dims import QUOTIENTS

    found = {atom for mono, _ in d.terms for atom in mono}
    for atom in list(found):
        if atom in QUOTIENTS:
            found |= _atoms(QUOTIENTS[atom][0])
        if atom in FUNCTIONS:
            found |= _atoms(FUNCTIONS[atom][1]) | _atoms(FUNCTIONS[atom][2])
    return found


def _fits(n: Dim, m: Dim, facts: Facts = frozenset()) -> bool:
    """Whether n <= m for every attach: equal, or m is n with d_in, d_out raised to max_d_in, max_d_out (with
    positive coefficients, so raising them cannot lower m; inside min, max and the numerator of ceil_div too,
    which only grow with their arguments)."""
    if n == m:
        return True
    if not _grows(m):
        return False
    lowered = m.substitute(lambda atom: Dim.of(MAX_DIMS.get(atom, atom)), facts)
    return lowered == n.assume(facts)


def _grows(m: Dim) -> bool:
    """Whether m can only grow as max_d_in, max_d_out grow: positive coefficients, also inside min, max and the
    numerators of ceil_div and quotients, whose divisors do not read them."""
    from .dims import QUOTIENTS

    if any(c < 0 for _, c in m.terms):
        return False
    for atom in {a for mono, _ in m.terms for a in mono}:
        if atom in FUNCTIONS:
            fn, a, b = FUNCTIONS[atom]
            if not _grows(a) or (not _grows(b) if fn != "ceil_div" else bool(_atoms(b) & set(MAX_DIMS))):
                return False
        if atom in QUOTIENTS and (not _grows(QUOTIENTS[atom][0]) or _atoms(QUOTIENTS[atom][1]) & set(MAX_DIMS)):
            return False
    return True


def source_of(source: str, node: Node) -> str:
    """The spec text of a node (its first line)."""
    line = source.splitlines()[node.span.line - 1]
    return line[node.span.col - 1 : node.span.end_col - 1]


def typecheck(spec: ast.Spec, source: str, file: str) -> Program:
    """The typed program; every type and stage error is in its `problems`."""
    return Checker(spec, source, file).run()
