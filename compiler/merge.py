"""Pass: the merged weight and bias of a forward rule that is affine in x, or why there are none.

A forward rule maps the layer input x to a new output (site `output`: from x and y = W x + b) or to
a new input (site `input`: the frozen layer then computes W x' + b). When the rule is affine in x,
one plain linear layer computes the same: this pass derives its weight and bias as expressions of
the spec's own values, which the order pass then orders like any other (a merged LoRA is
`W + s * (B @ A)`, never a product with an identity matrix):

    output:  rule = L x + c   (y stands for W x + b)   ->  weight L, bias c
    input:   rule = L x + c                            ->  weight W L, bias W c + b

Each sub-expression of the rule is analysed into an `Affine`: a sum of linear terms plus a constant.
A term is a matrix expression [rows, d_in] applied to x, or IDENTITY (x itself). The rules:
    x -> I;  y -> W + b;  a value that is the same for every token -> a constant;
    a + b, a - b, -a -> termwise;  s * a, a / s (s a scalar) -> scaled;  v * a (v a vector) -> diag(v) @ a;
    M @ a (M a matrix, diag or any structured operator) -> M @ each term;  detach(a), dropout(a, p) -> a;
    op(...) @ M (a structured operator on a matrix or vector: at the output site, W's columns) -> the
    operator applied to M's columns as to per-token rows;
    dot(v, a) -> the per-token scalar (a's terms transposed onto v), and u * dot(v, a) -> outer products.
Anything else that depends on x (an elementwise function, a product of two values that depend on x,
a norm of one) makes the rule non-affine: the pass records the reason, with its spec line.
A structured operator (builtins.OPERATORS) left as a matrix in the result (`kron(A, B)` at the output
site) is marked `dense(...)`: merged() builds it by applying the operator to identity rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .dims import Dim
from .ir import MergeLet, MergeRule, Node, Op, RefKind, Staged, flatten_chain
from .names import LAYER_LOCALS, METHOD_ARGS, fresh
from .types import CONST, FLOAT, FORWARD, Type, tensor


class NotAffine(Exception):
    """The rule is not affine in x; the message says where and why."""


@dataclass(frozen=True)
class Affine:
    """sum(terms) @ x + const. A term is a matrix [rows, d_in] (or, for a per-token scalar, a vector
    [d_in]); the identity is `identity`, possibly scaled. const None is zero."""

    terms: tuple[Node, ...]
    const: Node | None


def derive_merge(staged: Staged) -> Staged:
    """`staged` with its merge rule, or the reason its forward has none."""
    try:
        rule = _Deriver(staged).rule()
    except NotAffine as exc:
        return replace(staged, merge=None, merge_refusal=str(exc))
    return replace(staged, merge=rule, merge_refusal=None)


class _Deriver:
    def __init__(self, staged: Staged) -> None:
        self.p = staged
        self.lets = {let.names[0]: let for let in staged.lets if let.stage == FORWARD and len(let.names) == 1}
        self.memo: dict[str, Affine] = {}
        self.span = staged.forward.span
        self.d_in, self.d_out = Dim.of("d_in"), Dim.of("d_out")
        self.identity = Node(
            Op.REF,
            (),
            Type("tensor", (self.d_in, self.d_in), operator="identity"),
            FORWARD,
            self.span,
            "x",
            RefKind.INPUT,
        )
        self.W = self.input_ref("W", tensor(self.d_out, self.d_in))
        self.bias = self.input_ref("bias", tensor(self.d_out))

    def rule(self) -> MergeRule:
        lets = tuple(replace(let, value=densify(let.value)) for let in self.merge_lets())
        form = self.affine(self.p.forward)
        if self.p.site == "output":  # x itself cannot be a term here: the types keep [d_in] off [d_out]
            self.row_lets: list[MergeLet] = []
            weight = self.total([self.operator_rows(t, lets) for t in form.terms])
            bias = None if form.const is None else densify(form.const)
            return MergeRule(densify(weight), bias, lets + tuple(self.row_lets))
        weight = self.total([self.after_weight(t) for t in form.terms])
        bias = self.bias if form.const is None else self.plus(self.matmul(self.W, form.const), self.bias)
        return MergeRule(densify(weight), None if bias is None else densify(bias), lets)

    def merge_lets(self) -> tuple[MergeLet, ...]:
        """Each per-token let in spec order, analysed once (so a long chain of lets is no deep recursion).
        At the output site a let of the output's width becomes locals of merged(): its weight under its own
        name, and its bias, which later expressions read instead of repeating its terms."""
        taken = set(METHOD_ARGS["merged"] | LAYER_LOCALS) | {n for let in self.p.lets for n in let.names}
        taken |= {h.name for h in self.p.hypers} | {p.name for p in self.p.params} | {b.name for b in self.p.buffers}
        found: list[MergeLet] = []
        for name, let in self.lets.items():
            if not let.value.type.token:
                continue
            form = self.affine(let.value)
            if self.p.site == "output" and let.types[0].shape == (self.d_out,) and form.terms:
                found.append(MergeLet(name, self.total(list(form.terms)), let.line))
                bias = form.const
                if bias is not None and bias.op is not Op.REF:  # a bare name needs no local of its own
                    bias_name = fresh(f"{name}_bias", taken)
                    taken.add(bias_name)
                    found.append(MergeLet(bias_name, form.const, let.line))
                    bias = Node(Op.REF, (), tensor(self.d_out), FORWARD, self.span, bias_name, RefKind.LET)
                weight = Node(Op.REF, (), tensor(self.d_out, self.d_in), FORWARD, self.span, name, RefKind.LET)
                form = Affine((weight,), bias)
            self.memo[name] = form
        return tuple(found)

    # ------------------------------------------------------------ the analysis

    def affine(self, node: Node) -> Affine:
        if not node.type.token:
            return Affine((), node)
        if node.op is Op.REF:
            return self.ref(node)
        if node.op is Op.NEG:
            return self.scaled(self.affine(node.args[0]), self.neg)
        if node.op in (Op.ADD, Op.SUB):
            left, right = (self.affine(a) for a in node.args)
            if node.op is Op.SUB:
                right = self.scaled(right, self.neg)
            if left.const is None or right.const is None:
                const = left.const if right.const is None else right.const
            else:
                const = self.plus(left.const, right.const)
            return Affine(left.terms + right.terms, const)
        if node.op is Op.MUL:
            return self.product(node)
        if node.op is Op.DIV:
            value, by = node.args
            if by.type.token:
                raise self.refuse(node, "divides by a value that depends on x")
            if not by.type.is_scalar:
                by = self.binary(Op.DIV, Node(Op.NUM, (), FLOAT, CONST, self.span, "1.0"), by)
                return self.scale_rows(by, self.affine(value))
            return self.scaled(self.affine(value), lambda e: self.coef(Op.DIV, by, e))
        if node.op is Op.MATMUL:
            coefs, factors = flatten_chain(node)
            *matrices, last = factors
            form = self.affine(last)
            for matrix in reversed(matrices):
                if matrix.type.token:
                    raise self.refuse(node, "multiplies two values that depend on x")
                if matrix.type.operator and self.p.site == "input" and not all(map(self.is_identity, form.terms)):
                    name = matrix.type.operator.removesuffix("_T")
                    raise self.refuse(node, f"applies {name}(...) to a matrix times x at the input site")
                form = Affine(
                    tuple(self.matmul(matrix, t) for t in form.terms),
                    None if form.const is None else self.matmul(matrix, form.const),
                )
            for op, coef in coefs:
                form = self.scaled(form, lambda e, op=op, coef=coef: self.coef(op, coef, e))
            return form
        if node.op is Op.IF:
            return self.conditional(node)
        if node.op is Op.CALL and node.value in (
            "detach",
            "dropout",
            "reparametrize",
        ):  # merged() is the eval-mode layer
            return self.affine(node.args[0])
        if node.op is Op.CALL and node.value == "dot":
            vector, value = node.args
            form = self.affine(value)
            # dot(v, L x + c) = (L^T v) . x + v . c: each term becomes the vector L^T v [d_in].
            terms = tuple(self.matmul(self.transpose(t), vector) for t in form.terms)
            const = None if form.const is None else replace(node, args=(vector, form.const), type=Type("tensor"))
            return Affine(terms, const)
        what = f"{node.value}()" if node.op is Op.CALL else f"`{node.op.value}`"
        raise self.refuse(node, f"applies {what} to a value that depends on x")

    def conditional(self, node: Node) -> Affine:
        """`A if test else B` with A = L1 x + c1, B = L2 x + c2: (L1 if test else L2) x + (c1 if test else c2),
        each form merged on its own."""
        test, *forms = node.args
        then, other = (self.affine(form) for form in forms)
        if not then.terms or not other.terms or (then.const is None) != (other.const is None):
            raise self.refuse(node, "chooses between forms of which only one has a term in x, or a constant")
        rows = node.type.shape[0]
        weights = (self.total(list(then.terms)), self.total(list(other.terms)))
        weight = Node(Op.IF, (test, *weights), tensor(rows, self.d_in), FORWARD, self.span)
        const = None
        if then.const is not None:
            const = Node(Op.IF, (test, then.const, other.const), then.const.type, FORWARD, self.span)
        return Affine((weight,), const)

    def ref(self, node: Node) -> Affine:
        if node.ref_kind is RefKind.INPUT and node.value == "x":
            return Affine((self.identity,), None)
        if node.ref_kind is RefKind.INPUT and node.value == "y":
            return Affine((self.W,), self.bias)
        if node.ref_kind is RefKind.LET and node.value in self.lets:
            if node.value not in self.memo:
                self.memo[node.value] = self.affine(self.lets[node.value].value)
            return self.memo[node.value]
        raise self.refuse(node, f"reads {node.value}, which the merge cannot express")

    def product(self, node: Node) -> Affine:
        left, right = node.args
        if left.type.token and right.type.token:
            raise self.refuse(node, "multiplies two values that depend on x")
        value, by = (left, right) if left.type.token else (right, left)
        form = self.affine(value)
        if by.type.is_scalar:
            return self.scaled(form, lambda e: self.coef(Op.MUL, by, e))
        if value.type.is_scalar:  # a per-token scalar l . x + k times a constant vector u: u l^T x + u k
            terms = tuple(self.coef(Op.MUL, by, t, outer=True) for t in form.terms)
            const = None if form.const is None else self.binary(Op.MUL, by, form.const)
            return Affine(terms, const)
        return self.scale_rows(by, form)

    def scale_rows(self, vector: Node, form: Affine) -> Affine:
        """diag(vector) @ (L x + c)."""
        diag = Node(
            Op.CALL, (vector,), Type("tensor", (vector.type.shape[0],) * 2, diag=True), FORWARD, self.span, "diag"
        )
        terms = form.terms
        if len(terms) > 1 and not any(self.is_identity(self.peel(t)[1]) for t in terms):
            terms = (self.total(list(terms)),)  # diag(v) @ (W + s B A): one row scaling, not one a term
        return Affine(
            tuple(self.matmul(diag, t) for t in terms),
            None if form.const is None else self.binary(Op.MUL, vector, form.const),
        )

    # ------------------------------------------------------------ building expressions

    def refuse(self, node: Node, why: str) -> NotAffine:
        return NotAffine(f"the forward (line {node.span.line}) {why}, so it is not affine in x")

    def scaled(self, form: Affine, f) -> Affine:
        return Affine(tuple(f(t) for t in form.terms), None if form.const is None else f(form.const))

    def is_identity(self, e: Node) -> bool:
        return e.op is Op.REF and e.type.operator == "identity"

    def input_ref(self, name: str, t: Type) -> Node:
        return Node(Op.REF, (), t, FORWARD, self.span, name, RefKind.INPUT)

    def binary(self, op: Op, a: Node, b: Node) -> Node:
        shape = a.type.shape if len(a.type.shape) >= len(b.type.shape) else b.type.shape
        return Node(op, (a, b), Type("tensor", shape), FORWARD, self.span)

    def plus(self, a: Node, b: Node) -> Node | None:
        """a + b, or None (zero) when one is the negation of the other (`y - bias + ... + bias`)."""
        if (b.op is Op.NEG and b.args[0] == a) or (a.op is Op.NEG and a.args[0] == b):
            return None
        return self.binary(Op.SUB, a, b.args[0]) if b.op is Op.NEG else self.binary(Op.ADD, a, b)

    def coef(self, op: Op, coef: Node, e: Node, outer: bool = False) -> Node:
        """`coef * e` or `e / coef`; with outer=True, coef is a vector u and e a vector l: the matrix u l^T."""
        if outer:
            return Node(
                Op.CALL, (coef, e), Type("tensor", (coef.type.shape[0], e.type.shape[0])), FORWARD, self.span, "outer"
            )
        return Node(op, (coef, e) if op is Op.MUL else (e, coef), e.type, FORWARD, self.span)

    def neg(self, e: Node) -> Node:
        return e.args[0] if e.op is Op.NEG else Node(Op.NEG, (e,), e.type, FORWARD, self.span)

    def matmul(self, a: Node, b: Node) -> Node:
        if self.is_identity(a):
            return b
        if self.is_identity(b):
            return a
        if a.type.operator and not b.type.operator:
            return self.operator_on(a, b)
        coefs, core = self.peel(b)
        if coefs and self.is_identity(core):  # M @ (s * I) = s * M
            out = a
            for op, c in coefs:
                out = self.coef(op, c, out)
            return out
        shape = a.type.shape[:1] + b.type.shape[1:]
        return Node(Op.MATMUL, (a, b), Type("tensor", shape), FORWARD, self.span)

    def operator_on(self, op: Node, m: Node) -> Node:
        """A structured operator applied to a vector, or to each column of a matrix M as to per-token rows:
        (op @ M^T-rows)^T, so the merge applies it as the forward does and never builds it densely."""
        rows = op.type.shape[0]
        if len(m.type.shape) == 1:
            source = replace(m, type=tensor(m.type.shape[0], token=True))
            return Node(Op.MATMUL, (op, source), tensor(rows, token=True), FORWARD, self.span)
        source = Node(Op.T, (m,), tensor(m.type.shape[0], token=True), FORWARD, self.span)
        applied = Node(Op.MATMUL, (op, source), tensor(rows, token=True), FORWARD, self.span)
        return Node(Op.T, (applied,), tensor(rows, m.type.shape[1]), FORWARD, self.span)

    def peel(self, e: Node) -> tuple[list[tuple[Op, Node]], Node]:
        """The scalar coefficients around e, outermost first, and what they scale."""
        coefs: list[tuple[Op, Node]] = []
        while True:
            if e.op is Op.MUL and e.args[0].type.is_scalar and not e.args[1].type.is_scalar:
                coefs.append((Op.MUL, e.args[0]))
                e = e.args[1]
            elif e.op is Op.DIV and e.args[1].type.is_scalar and not e.args[0].type.is_scalar:
                coefs.append((Op.DIV, e.args[1]))
                e = e.args[0]
            else:
                return coefs, e

    def transpose(self, e: Node) -> Node:
        """e^T with the transpose pushed onto the factors: (U @ diag(s) @ Vt)^T = Vt^T @ diag(s) @ U^T."""
        if e.type.diag or self.is_identity(e) or len(e.type.shape) < 2:
            return e
        if e.op is Op.MATMUL:
            return self.matmul(self.transpose(e.args[1]), self.transpose(e.args[0]))
        if e.op is Op.MUL and e.args[0].type.is_scalar:
            return self.coef(Op.MUL, e.args[0], self.transpose(e.args[1]))
        if e.op is Op.DIV and e.args[1].type.is_scalar:
            return self.coef(Op.DIV, e.args[1], self.transpose(e.args[0]))
        if e.op is Op.NEG:
            return self.neg(self.transpose(e.args[0]))
        if e.op in (Op.ADD, Op.SUB):
            return self.binary(e.op, self.transpose(e.args[0]), self.transpose(e.args[1]))
        if e.op is Op.T:
            return e.args[0]
        if e.op is Op.IF:
            test, then, other = e.args
            rows, cols = e.type.shape
            return Node(
                Op.IF, (test, self.transpose(then), self.transpose(other)), tensor(cols, rows), FORWARD, self.span
            )
        if e.type.operator:
            return Node(Op.T, (e,), replace(e.type, operator=e.type.operator + "_T"), FORWARD, self.span)
        rows, cols = e.type.shape
        return Node(Op.T, (e,), Type("tensor", (cols, rows)), FORWARD, self.span)

    def total(self, terms: list[Node]) -> Node:
        out = terms[0]
        for term in terms[1:]:
            out = self.binary(Op.SUB, out, term.args[0]) if term.op is Op.NEG else self.binary(Op.ADD, out, term)
        return out

    def operator_rows(self, term: Node, lets: tuple[MergeLet, ...]) -> Node:
        """A term M1 @ ... @ Mj @ op1 @ ... (a structured operator after j >= 1 matrices) as a chain over the
        rows of M1 @ ... @ Mj: each row goes through the operators transposed, as they apply to x, so no
        operator is built densely (BOFT's diag(s) @ W @ butterfly(O).T). A term with no operator, or one that
        starts with an operator (C3A's blockcirculant(K) / d_in), is kept: merged() builds that operator."""
        coefs, core = self.peel(term)
        inner, factors = flatten_chain(core)
        first = next((i for i, f in enumerate(factors) if f.type.operator), None)
        if first is None or first == 0:  # an operator first: merged() builds it, from identity rows (emit)
            return term
        rows = factors[0]
        for factor in factors[1:first]:
            rows = Node(Op.MATMUL, (rows, factor), tensor(rows.type.shape[0], factor.type.shape[1]), FORWARD, self.span)
        if rows.op is not Op.REF:  # a product: a local of merged(), so the chain does not flatten into it
            taken = set(METHOD_ARGS["merged"] | LAYER_LOCALS) | {n for let in self.p.lets for n in let.names}
            taken |= (
                {h.name for h in self.p.hypers} | {p.name for p in self.p.params} | {b.name for b in self.p.buffers}
            )
            taken |= {let.name for let in (*lets, *self.row_lets)}
            self.row_lets.append(MergeLet(fresh("rows", taken), rows, self.span.line))
            rows = Node(Op.REF, (), rows.type, FORWARD, self.span, self.row_lets[-1].name, RefKind.LET)
        chain = replace(rows, type=tensor(rows.type.shape[1], token=True))
        for factor in factors[first:]:  # each row m becomes m F1 ... Fk
            chain = Node(
                Op.MATMUL, (self.transpose(factor), chain), tensor(factor.type.shape[1], token=True), FORWARD, self.span
            )
        for op, coef in coefs + inner:
            chain = self.coef(op, coef, chain)
        return chain

    def after_weight(self, term: Node) -> Node:
        """W @ term as a chain over the rows of W: each row goes through the factors of term, transposed, in
        order, so the input site's operators (householder) apply as they do to x and no [d_in, d_in] matrix
        is formed."""
        if term.op is Op.NEG:  # `input x + op(...) @ x - x`: W @ (-I) is -W
            return self.neg(self.after_weight(term.args[0]))
        coefs, core = self.peel(term)
        if self.is_identity(core):
            chain = self.W
        else:
            chain = Node(Op.REF, (), tensor(self.d_in, token=True), FORWARD, self.span, "W", RefKind.INPUT)
            inner, factors = flatten_chain(core)
            coefs += inner
            for factor in factors:  # W @ F1 @ ... @ Fk: each row w becomes w F1 ... Fk
                chain = Node(Op.MATMUL, (self.transpose(factor), chain), chain.type, FORWARD, self.span)
        for op, coef in coefs:
            chain = self.coef(op, coef, chain)
        return chain


def densify(node: Node) -> Node:
    """`node` with every structured operator that is used as a matrix (`kron(A, B)` as a term of a merged
    weight, `fold(r, n).T @ M`) wrapped in a `dense` call, which merged() builds as the [rows, cols] matrix by
    applying the operator's transpose to the rows of the identity (row i of M is M^T e_i), whatever the
    operator. An operator applied to rows (the input site's chain over the rows of W) stays a step."""
    operator = node.type.operator and node.type.operator != "identity"
    if operator and node.op in (Op.CALL, Op.T):
        return Node(Op.CALL, (node,), Type("tensor", node.type.shape), node.stage, node.span, "dense")
    if node.op is Op.MATMUL and node.args[1].type.token and node.args[0].type.operator:
        return replace(node, args=(node.args[0], densify(node.args[1])))
    if node.op is Op.CALL and node.value == "dense" or not node.args:
        return node
    args = tuple(densify(a) for a in node.args)
    return replace(node, args=args, type=Type("tensor", node.type.shape)) if operator else replace(node, args=args)
