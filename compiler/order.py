"""Pass: the evaluation order of every @ chain, as data (TokenChain, MatrixChain) that emit prints.

The spec's math uses column vectors (`B @ A @ x`); at run time tensors are rows with batch dims in
front (`x` is [..., d_in]). A chain applied to a per-token vector runs right to left, one step per
factor (`Ax = x @ A.T`, then `BAx = Ax @ B.T`), so a low-rank chain never forms a dense matrix, and
its scalar coefficients multiply the narrowest rows. A chain of matrices folds its diagonal factors
into broadcasts, then takes the cheapest product order (the classic matrix-chain dynamic programme).

The cost model: a product [m, k] @ [k, n] costs m*k*n multiplies; a per-token step costs its output
width. Sizes are estimates, since the real ones are known only per layer at attach:
  - d_in = d_out = 4096 (ASSUMED_LAYER);
  - an int hyper is its default when that is a number literal; any other dim atom counts as 8 (OTHER).
The sizes a decision read are kept in `Staged.estimates`; the generated module's docstring states them.
"""

from __future__ import annotations

from dataclasses import replace

from .dims import FUNCTIONS, Dim
from .ir import (
    Apply,
    Broadcast,
    Expr,
    Folded,
    Guard,
    Hoisted,
    IndexBound,
    Leaf,
    MatrixChain,
    MergeRule,
    Node,
    Op,
    Part,
    Product,
    RefKind,
    Staged,
    Step,
    TokenChain,
    flatten_chain,
    has_chain,
    with_args,
)
from .names import Scope
from .types import CONST, FORWARD, INIT

ASSUMED_LAYER = {"d_in": 4096, "d_out": 4096}
OTHER = 8  # Dim.estimate's size for an atom it is not given


def order(staged: Staged) -> Staged:
    """`staged` with every @ chain in every expression replaced by its ordered form, the locals of its
    per-token steps named, method by method in the order emit prints them."""
    sizes = dict(ASSUMED_LAYER)
    for hyper in staged.hypers:
        if hyper.default.op is Op.NUM:
            sizes[hyper.name] = max(1, int(float(hyper.default.value)))
    spec_names = {h.name for h in staged.hypers} | {n for let in staged.lets for n in let.names if n != "_"}
    spec_names |= {p.name for p in staged.params} | {b.name for b in staged.buffers} | {s.name for s in staged.stats}
    o = _Orderer(sizes, spec_names)
    hypers = tuple(replace(h, default=o.arrange(h.default)) for h in staged.hypers)  # constants: no steps
    guards = tuple(o.guard(g) for g in staged.guards)
    lets = {i: let for i, let in enumerate(staged.lets) if let.stage == CONST}
    o.method("init")
    lets |= {i: replace(let, value=o.arrange(let.value)) for i, let in enumerate(staged.lets) if let.stage == INIT}
    params = tuple(replace(p, init=o.arrange(p.init)) for p in staged.params)
    buffers = tuple(replace(b, value=o.arrange(b.value)) if isinstance(b, Hoisted) else b for b in staged.buffers)
    o.method("residual")
    residual = o.arrange(staged.residual) if staged.residual is not None else None
    o.method("forward")
    lets |= {i: replace(let, value=o.arrange(let.value)) for i, let in enumerate(staged.lets) if let.stage == FORWARD}
    forward = o.arrange(staged.forward)
    o.method("merged")
    merge = staged.merge
    if merge is not None:
        bias = o.arrange(merge.bias) if merge.bias is not None else None
        merge_lets = tuple(replace(let, value=o.arrange(let.value)) for let in merge.lets)
        merge = MergeRule(o.arrange(merge.weight), bias, merge_lets, o.scope.temp("merged_weight"))
    return replace(
        staged,
        hypers=hypers,
        lets=tuple(lets[i] for i in range(len(staged.lets))),
        params=params,
        buffers=buffers,
        guards=guards,
        residual=residual,
        forward=forward,
        merge=merge,
        estimates=tuple((atom, sizes.get(atom, OTHER)) for atom in sorted(o.read) if atom not in FUNCTIONS),
    )


class _Orderer:
    def __init__(self, sizes: dict[str, int], spec_names: set[str]) -> None:
        self.sizes = sizes
        self.spec_names = spec_names
        self.read: set[str] = set()  # the atoms whose estimated size decided an order
        self.scope: Scope | None = None  # the method being ordered: where step locals are named

    def method(self, name: str) -> None:
        self.scope = Scope(name, self.spec_names)

    def estimate(self, dim: Dim) -> int:
        self.read |= dim.atoms()
        return dim.estimate(self.sizes)

    def guard(self, guard: Guard) -> Guard:
        if isinstance(guard.cond, Node):
            return replace(guard, cond=self.arrange(guard.cond))
        if isinstance(guard.cond, IndexBound):
            return replace(guard, cond=replace(guard.cond, index=self.arrange(guard.cond.index)))
        return guard

    def arrange(self, node: Expr) -> Expr:
        if node.op is Op.IF:
            return self.conditional(node)
        if has_chain(node):
            coefs, factors = flatten_chain(node)
            if len(factors) > 1:
                ordered = tuple((op, self.arrange(c)) for op, c in coefs)
                if factors[-1].type.token:
                    return self.token_chain(ordered, factors, node)
                return self.matrix_chain(ordered, factors, node)
        return with_args(node, tuple(self.arrange(a) for a in node.args)) if node.args else node

    def conditional(self, node: Node) -> Node:
        """Each form ordered on its own; both assign one local (`value`), a per-token chain by its last step."""
        test, then, other = (self.arrange(a) for a in node.args)
        assert self.scope is not None, "a conditional outside a method"
        return _assign(replace(node, args=(test, then, other)), self.scope.temp("h"))

    def token_chain(self, coefs: tuple[tuple[Op, Expr], ...], factors: list[Expr], node: Node) -> TokenChain:
        """Each step's local is named after what it holds, innermost first: `Ax`, then `sAx` (scaled),
        then `BsAx`; `h` when that grows past 12 characters or the input is an expression."""
        *matrices, last = factors
        scale_at = -1
        if coefs:  # where to scale is the only decision here
            widths = [self.estimate(last.type.shape[-1])] + [self.estimate(f.type.shape[0]) for f in reversed(matrices)]
            scale_at = widths.index(min(widths))
        scope = self.scope
        assert scope is not None, "a per-token chain outside a method"
        source = self.arrange(last)
        label = printed_name(source) or ""
        source_temp = ""
        if not label or scale_at == 0:
            source_temp = label = scope.temp("s" + label if scale_at == 0 and label else "h")
        steps = []
        for step_no, factor in enumerate(reversed(matrices), start=1):
            step, operand = self.step(factor)
            temp = ""
            if step in (Step.MATMUL_T, Step.SCALE) and printed_name(operand) is None:
                temp = scope.temp("M" if step is Step.MATMUL_T else "d")
            if step in (Step.OPERATOR, Step.OPERATOR_T):
                short = "R" + "T" * (step is Step.OPERATOR_T)
            else:
                short = (temp or printed_name(operand)) + "T" * (step is Step.MATMUL)
            label = ("s" if step_no == scale_at else "") + short + label
            result = scope.temp(label if len(label) <= 12 else "h")
            steps.append(Apply(step, operand, factor.type.shape[0], result, temp))
        return TokenChain(source, source_temp, tuple(steps), coefs, scale_at, node.type, node.stage, node.span)

    def step(self, factor: Expr) -> tuple[Step, Expr]:
        if factor.type.operator:  # op(...), op(...).T, op(...).T.T ...: one call, maybe transposed
            call, transposed = factor, False
            while call.op is Op.T:
                call, transposed = call.args[0], not transposed
            return (Step.OPERATOR_T if transposed else Step.OPERATOR), self.arrange(call)
        if factor.type.diag:
            return Step.SCALE, self.arrange(factor.args[0] if factor.op is Op.CALL else factor)
        if factor.op is Op.T and factor.args[0].op is Op.REF:
            return Step.MATMUL, factor.args[0]
        return Step.MATMUL_T, self.arrange(factor)

    def matrix_chain(self, coefs: tuple[tuple[Op, Expr], ...], factors: list[Expr], node: Node) -> MatrixChain:
        folded: list[Part] = []
        for factor in factors:
            shape = factor.type.shape
            is_diag_call = factor.op is Op.CALL and factor.value == "diag"
            item = Leaf(
                self.arrange(factor.args[0] if is_diag_call else factor),
                shape[0],
                shape[1] if len(shape) == 2 else None,
                factor.type.diag,
            )
            prev = folded[-1] if folded else None
            if prev is not None and prev.diag:
                how = Broadcast.DIAGS if item.diag else Broadcast.ROWS if item.cols is not None else Broadcast.VECTOR
                folded[-1] = Folded(how, prev, item, item.rows, item.cols, item.diag)
            elif prev is not None and item.diag:
                folded[-1] = Folded(Broadcast.COLUMNS, prev, item, prev.rows, prev.cols, False)
            else:
                folded.append(item)
        return MatrixChain(self.cheapest(folded), coefs, node.type, node.stage, node.span)

    def cheapest(self, items: list[Part]) -> Part:
        """The product tree of `items` with the fewest estimated multiplies (the first such, on ties)."""
        n = len(items)
        if n < 3:  # one way to multiply: nothing to estimate
            return items[0] if n == 1 else Product(items[0], items[1])
        dims = [self.estimate(items[0].rows)]
        dims += [self.estimate(i.cols) if i.cols is not None else 1 for i in items]
        cost = [[0] * n for _ in range(n)]
        split = [[0] * n for _ in range(n)]
        for length in range(2, n + 1):
            for i in range(n - length + 1):
                j = i + length - 1
                options = [cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1] for k in range(i, j)]
                cost[i][j] = min(options)
                split[i][j] = i + options.index(cost[i][j])

        def build(i: int, j: int) -> Part:
            if i == j:
                return items[i]
            k = split[i][j]
            return Product(build(i, k), build(k + 1, j))

        return build(0, n - 1)


def _assign(form: Expr, local: str) -> Expr:
    """`form` computed into `local`: a per-token chain's last step, a conditional's value and its forms'."""
    if isinstance(form, TokenChain):
        return replace(form, steps=(*form.steps[:-1], replace(form.steps[-1], result=local)))
    if isinstance(form, Node) and form.op is Op.IF:
        test, *forms = form.args
        return replace(form, args=(test, *(_assign(f, local) for f in forms)), value=local)
    return form


def chain_order(part: Part | TokenChain | MatrixChain) -> str:
    """A chain's evaluation order in one line, for tests and readers; operands that are not names show
    as `(...)`. A per-token chain in math order, innermost first: `B @ (s * (A @ x))`; a matrix chain
    as its product tree with folded diagonals: `P @ (Q @ R)`, `(m * n)[:, None] * B @ A`."""
    if isinstance(part, TokenChain):
        text = _name(part.source)
        text = f"s * {_wrap(text)}" if part.scale_at == 0 else text
        for i, apply in enumerate(part.steps, start=1):
            operand = _name(apply.operand) + (".T" if apply.step is Step.MATMUL else "")
            if apply.step in (Step.OPERATOR, Step.OPERATOR_T):
                call = apply.operand
                operand = f"{call.value}({', '.join(_name(a) for a in call.args)})"
                operand += ".T" if apply.step is Step.OPERATOR_T else ""
            text = f"{operand} {'*' if apply.step is Step.SCALE else '@'} {_wrap(text)}"
            text = f"s * {_wrap(text)}" if part.scale_at == i else text
        return text
    if isinstance(part, MatrixChain):
        return ("s * " if part.coefs else "") + chain_order(part.tree)
    if isinstance(part, Leaf):
        return _name(part.node)
    if isinstance(part, Folded):
        left, right = chain_order(part.left), chain_order(part.right)
        return f"({left}[:, None] * {right})" if part.how is Broadcast.ROWS else f"({left} * {right})"
    right = chain_order(part.right)
    return f"{chain_order(part.left)} @ {f'({right})' if isinstance(part.right, Product) else right}"


def _name(node: Expr) -> str:
    if isinstance(node, Node) and node.op is Op.REF:
        return node.value
    if isinstance(node, Node) and node.op is Op.T:
        return _name(node.args[0]) + ".T"
    return "(...)"


def _wrap(text: str) -> str:
    return f"({text})" if " " in text else text


def printed_name(node: Expr) -> str | None:
    """The local an expression is printed as when emit prints it as a bare name, else None."""
    while isinstance(node, Node):
        if node.op is Op.IF:
            return node.value or None  # a conditional prints as the local its forms assign
        if node.op is Op.REF:
            return None if node.ref_kind is RefKind.HYPER else node.value  # a hyper is cfg.NAME
        if (node.op is Op.T and node.type.diag) or (node.op is Op.CALL and node.value == "diag"):
            node = node.args[0]  # diag(v) and its transpose print as v
        elif node.op is Op.NEG and node.args[0].op is Op.NEG:
            node = node.args[0].args[0]  # --v prints as v
        else:
            return None
    return None
