"""Each compiler pass on its own: input -> expected fixtures, one file per pass (sqlglot's optimizer fixtures).

tests/compiler_fixtures/PASS.txt holds cases separated by blank lines: `# title: ...`, the spec's lines
(the test adds the header `adapter t "T"`, line 1), then `=> ...` lines with what the pass gives, as the
renderer of that pass below prints it (emit's fixtures are specs/ -> generated/, in test_compiler.py).
Also: no pass changes its input.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_lite.compiler import ast
from lora_lite.compiler.check import check
from lora_lite.compiler.fold import fold
from lora_lite.compiler.ir import Hoisted, Leaf, MatrixChain, Node, Product, TokenChain
from lora_lite.compiler.lints import lint
from lora_lite.compiler.merge import derive_merge
from lora_lite.compiler.order import chain_order, order
from lora_lite.compiler.parse import parse
from lora_lite.compiler.stage import stage
from lora_lite.compiler.typecheck import typecheck
from lora_lite.compiler.types import STAGE_NAMES

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "compiler_fixtures"
SPECS = sorted((ROOT / "specs").glob("*.adapter"))


def cases() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for path in sorted(FIXTURES.glob("*.txt")):
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            lines = block.strip("\n").splitlines()
            if not lines or not lines[0].startswith("# title: "):
                continue  # the file's own comment
            title = lines[0].removeprefix("# title: ")
            body = [line for line in lines[1:] if not line.startswith("=> ")]
            expected = [line.removeprefix("=> ") for line in lines[1:] if line.startswith("=> ")]
            found.append((path.stem, title, 'adapter t "T"\n' + "\n".join(body) + "\n", expected))
    return found


def typed(source: str):
    program = typecheck(parse(source, "t.adapter"), source, "t.adapter")
    assert not program.problems, program.problems
    return program


def render_typecheck(source: str) -> list[str]:
    program = typed(source)
    pairs = [(n, t, let.stage) for let in program.lets for n, t in zip(let.names, let.types, strict=True)]
    shown = [f"{n}: {t} {STAGE_NAMES[stage]}" for n, t, stage in pairs]
    return ["; ".join(shown)]


def render_fold(source: str) -> list[str]:
    return [", ".join(f"{name} = {value!r}" for name, value in fold(typed(source)).values)]


def render_lints(source: str) -> list[str]:
    found = sorted(lint(fold(typed(source))).problems, key=lambda d: (d.line, d.col))
    return [", ".join(f"{d.code} {d.line}:{d.col}" for d in found) or "none"]


def render_stage(source: str) -> list[str]:
    staged = check(parse(source, "t.adapter"), source, "t.adapter")
    buffers = [
        f"{'hoisted' if isinstance(b, Hoisted) else 'saved'} {b.name} [{', '.join(map(str, b.shape))}]"
        for b in staged.buffers
    ]
    facts = ["quantizable"] * staged.quantizable + ["residual"] * staged.has_residual
    facts += ["init reads W"] * staged.init_reads_weight + ["forward reads W"] * staged.forward_reads_weight
    facts.append(f"trainable {staged.trainable_count}")
    return [
        f"buffers: {'; '.join(buffers) or 'none'}",
        f"facts: {', '.join(facts)}",
        f"guards: {'; '.join(g.message for g in staged.guards) or 'none'}",
    ]


def chains(node) -> list:
    """The outermost chains in an ordered expression."""
    if isinstance(node, (TokenChain, MatrixChain)):
        return [node]
    return [c for arg in node.args for c in chains(arg)]


def render_order(source: str) -> list[str]:
    ordered = order(check(parse(source, "t.adapter"), source, "t.adapter"))
    rows = [(let.names[0], let.value) for let in ordered.lets] + [("forward", ordered.forward)]
    return [f"{name}: {chain_order(chain)}" for name, value in rows for chain in chains(value)]


def math(node: Node) -> str:
    """An IR expression as math, fully parenthesised: (+ W (* 2 (@ B A)))."""
    if node.op.value in ("num",):
        return node.value
    if node.op.value == "ref":
        return node.value
    if node.op.value == "call":
        return f"{node.value}({', '.join(math(a) for a in node.args)})"
    if node.op.value == "neg":
        return f"(- {math(node.args[0])})"
    if node.op.value == "T":
        return f"{math(node.args[0])}.T"
    return f"({node.op.value} {' '.join(math(a) for a in node.args)})"  # (if test then other): three


def render_merge(source: str) -> list[str]:
    staged = check(parse(source, "t.adapter"), source, "t.adapter")
    if staged.merge is None:
        return [f"refused: {staged.merge_refusal}"]
    bias = math(staged.merge.bias) if staged.merge.bias is not None else "0"
    return [f"weight: {math(staged.merge.weight)}", f"bias: {bias}"]


def sexpr(e: ast.Expr) -> str:
    match e:
        case ast.Num():
            return e.text
        case ast.Name():
            return e.id
        case ast.Call():
            return f"{e.fn}({', '.join(map(sexpr, e.args))})"
        case ast.BinOp():
            return f"({e.op} {sexpr(e.left)} {sexpr(e.right)})"
        case ast.Neg():
            return f"(- {sexpr(e.operand)})"
        case ast.Transpose():
            return f"{sexpr(e.operand)}.T"
        case ast.Cond():
            return f"(if {sexpr(e.test)} {sexpr(e.then)} {sexpr(e.other)})"
    raise AssertionError(e)


def render_parse(source: str) -> list[str]:
    shown = []
    for s in parse(source, "t.adapter").statements:
        match s:
            case ast.Hyper():
                shown.append(f"hyper {s.name}: {s.type} = {sexpr(s.default)}")
            case ast.Param():
                keyword = "param" if s.trainable else "frozen"
                shown.append(f"{keyword} {s.name}[{', '.join(map(sexpr, s.dims))}] = {sexpr(s.init)}")
            case ast.Let():
                shown.append(f"let {', '.join(s.names)} = {sexpr(s.value)}")
            case ast.Require():
                shown.append(f'require {sexpr(s.cond)}: "{s.message}"')
            case ast.Forward():
                shown.append(f"{s.site} {sexpr(s.value)}")
            case _:
                shown.append(type(s).__name__)
    return shown


RENDER: dict[str, Callable[[str], list[str]]] = {
    "parse": render_parse,
    "typecheck": render_typecheck,
    "fold": render_fold,
    "lints": render_lints,
    "stage": render_stage,
    "order": render_order,
    "merge": render_merge,
}


@pytest.mark.parametrize(("name", "title", "source", "expected"), cases(), ids=lambda v: v if len(v) < 60 else "")
def test_pass_fixture(name: str, title: str, source: str, expected: list[str]) -> None:
    assert RENDER[name](source) == expected, f"{name}.txt: {title}"


def test_every_pass_has_fixtures() -> None:
    assert {name for name, *_ in cases()} == set(RENDER)


def test_chain_order_is_read_from_the_tree_not_from_text() -> None:
    ordered = order(check(parse(CHAIN, "c.adapter"), CHAIN, "c.adapter"))
    (tree,) = (let.value.tree for let in ordered.lets if let.names == ("M",))
    assert isinstance(tree, Product) and isinstance(tree.left, Leaf) and isinstance(tree.right, Product)
    assert [leaf.node.value for leaf in (tree.left, tree.right.left, tree.right.right)] == ["P", "Q", "R"]


CHAIN = """adapter chain "Chain"
hyper small: int = 2
hyper big: int = 1024
param P[d_out, small] = zeros
param Q[small, big] = kaiming
param R[big, d_in] = kaiming
let M = P @ Q @ R
output y + M @ x
"""


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_no_pass_changes_its_input(spec: Path) -> None:
    """Every IR value is a frozen dataclass of tuples, and each pass leaves its input equal to a deep copy."""
    source = spec.read_text(encoding="utf-8")
    tree = parse(source, spec.name)
    steps: list[tuple[Callable, object]] = []
    program = typecheck(tree, source, spec.name)
    steps.append((lambda p: typecheck(p, source, spec.name), tree))
    for fn in (fold, lint):
        steps.append((fn, program))
        program = fn(program)
    staged = stage(program)
    steps += [(stage, program), (derive_merge, staged), (order, derive_merge(staged))]
    for fn, value in steps:
        before = copy.deepcopy(value)
        fn(value)
        assert value == before, fn
    for value in (tree, program, staged, derive_merge(staged), order(derive_merge(staged))):
        _assert_frozen(value)


def _assert_frozen(value: object) -> None:
    if isinstance(value, (list, dict, set)):
        raise AssertionError(f"a mutable {type(value).__name__} in the IR: {value!r:.80}")
    if isinstance(value, tuple):
        for item in value:
            _assert_frozen(item)
    elif dataclasses.is_dataclass(value):
        assert type(value).__dataclass_params__.frozen, type(value)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, dataclasses.fields(value)[0].name, None)
        for f in dataclasses.fields(value):
            _assert_frozen(getattr(value, f.name))


def test_nodes_compare_by_structure_not_position() -> None:
    first = typed(
        'adapter t "T"\nhyper r: int = 2\nlet a = r + 1\nlet b = r + 1\nparam g[d_out] = ones\noutput a * b * g * y\n'
    )
    a, b = (let.value for let in first.lets)
    assert isinstance(a, Node) and a == b and a.span != b.span


# The chains of every spec in specs/, in the order the order pass chose: (where, order). `(...)` is an
# operand that is not a bare name, `s` the chain's scalar coefficients.
SPEC_CHAINS = {
    "antipasto": ["forward: U @ ((...) * (Vt @ x))", "residual: (U * S) @ Vt"],
    "antipasto_ablate": ["h: U @ ((...) * (Vt @ x))", "residual: (U * S) @ Vt"],
    "antipasto_arrow": [
        "forward: U @ ((...) * (Vt @ x))",
        "forward: Uk @ ((...) @ (Sk * (Vtk @ x)))",
        "residual: (U * S) @ Vt",
    ],
    "antipasto_corda": ["U: W @ Cd", "Vt: V0t @ (...)", "forward: U @ ((...) * (Vt @ x))", "residual: (U * S) @ Vt"],
    # B's columns normalised first (B / ||b_i||: finite in fp16, see the spec), then a per-token chain.
    "delora": ["Bn: (B * (...))", "forward: Bn @ ((...) * (A @ (...)))"],
    "dora": ["V: s * (...) @ (...)", "forward: B @ (s * (A @ x))"],
    "eva": ["forward: B @ (s * (A @ x))"],
    "hra": ["forward: householder(U) @ x"],
    "oft": ["forward: blockdiag(R).T @ x"],
    "oft_cayley": ["forward: blockdiag(R).T @ x"],
    "boft": ["forward: W @ (butterfly(Q).T @ x)"],
    "ia3": [],
    "ia3_ff": [],
    # A first, then the scale on the rank-r rows, then B: the dense B @ A is never formed.
    "lora": ["forward: B @ (s * (A @ x))"],
    # diag(S) folds into broadcasts: U * S, and sqrt(S / s)[:, None] * Vt in the init.
    "pissa": ["forward: B @ (s * (A @ x))", "residual: (U * S) @ Vt", "A: ((...)[:, None] * Vt)", "B: (U * (...))"],
    "rs_lora": ["forward: B @ (s * (A @ x))"],
    "lorafa": ["forward: B @ (s * (A @ x))"],  # a frozen A orders like a param
    # Both diag factors become broadcasts on the narrow rows; no [d_out, d_in] product.
    "vera": ["forward: lambda_b * ((...) @ (lambda_d * ((...) @ x)))"],
    "adalora": ["forward: P @ (lam * (s * (Q @ x)))"],
    "rsdora": ["V: s * (...) @ (...)", "forward: B @ (s * (A @ x))"],
    # An elementwise product of matrices is one dense factor: s goes on the input rows.
    "loha": ["forward: (...) @ (s * x)"],
    "hira": ["forward: (...) @ x"],
    "beft": [],
    # PSOFT: the r x r rotation is applied to A x, never multiplied into B or A; s folds into B's buffer.
    "psoft": ["B: (U * (...))", "R: ((vector_b[:, None] * (...)) * vector_a)", "Ax: A @ x", "forward: frozen @ (...)"],
    # GLoRA's W * (Ad @ Au) is one dense factor, as PEFT's W + W * A + B.
    "glora": ["forward: (...) @ x", "forward: Bd @ (Bu @ x)"],
    "deft": ["forward: P @ (...)"],
    # relu(A W) [r, d_in] goes on x first: the [d_out, d_in] update PEFT builds is never formed.
    "peanut": ["forward: B @ (s * ((...) @ x))"],
    # The pairing permutation is a reshape applied to y's rows; the gates are broadcasts.
    "road": ["forward: rotate_half(d_out, group_size) @ y"],
    "road_2": ["forward: rotate_half(d_out, group_size) @ y"],
    "road_4": ["forward: rotate_half(d_out, group_size) @ y"],
    # R = sum_i v_i P_i is applied per token, as kron(v, I) on the stacked P h: never an r x r product per step.
    "tinylora": ["A: ((...)[:, None] * Vt)", "B: (U * (...))", "forward: B @ (kron(v, eye_r) @ (P @ (A @ x)))"],
    # 1 / d_in on the input rows, then the FFT operator: no [d_out, d_in] matrix.
    "c3a": ["forward: blockcirculant(K) @ (s * x)"],
    # The dense update (as PEFT's), applied to the input rows scaled first.
    "fourierft": ["forward: dW @ (s * x)"],
    # The Haar transforms as operators around one dense product with S: no [d_out, d_in] update.
    "waveft": ["forward: haar(d_out) @ (S @ (haar(d_in).T @ (s * x)))"],
    # The Kronecker operator applied to x (w1 X w2^T), never built; its factor w2 a small product.
    "lokr": ["forward: kron((...), (...)) @ x"],
    "miss": ["forward: block.T @ (fold(r, d_in) @ x)"],  # the chunk sum of x, then the block
    "miss_mini": ["forward: fold(mini_r, d_out).T @ (block.T @ (fold(r, d_in) @ x))"],  # then tiled to d_out
    # Block by block, the stride permutation between: no [d_out, d_in] matrix; s on the k*r-wide rows.
    "gralora": ["forward: blockdiag(B) @ (shuffle(k, r) @ (s * (blockdiag(A) @ x)))"],
    "vblora": ["forward: Bt.T @ (A @ x)"],  # A on x first: the [d_out, d_in] update is never formed
    # lambda_b * B is one factor after the sample, the lambdas on A's rows before it: no [d_out, d_in] product.
    "pvera": ["mu: (...) @ x", "logvar: (...) @ x", "forward: (...) @ (...)"],
    # One chain per form of the conditional: U_A (PEFT's lambda * A * gamma, [r*n, min(d_in, d_out)], built once a
    # step as PEFT builds it) and B's corner applied to the rows one after the other: no [d_out, d_in] product.
    "randlora": ["UA: ((...)[:, None] * K)", "forward: UB @ (UA @ x)", "forward: UA.T @ (UB.T @ x)"],
    # The sparse update applied to x as a sparse-times-dense product: never the dense [d_out, d_in] matrix.
    "shira": ["forward: sparse(weight, idx, d_out, d_in) @ x"],
}


def test_every_spec_has_its_chain_order_listed() -> None:
    assert {spec.stem for spec in SPECS} == set(SPEC_CHAINS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_spec_chain_order(spec: Path) -> None:
    source = spec.read_text(encoding="utf-8")
    ordered = order(check(parse(source, spec.name), source, spec.name))
    rows = [(let.names[0], let.value) for let in ordered.lets] + [("forward", ordered.forward)]
    rows += [("residual", ordered.residual)] if ordered.residual is not None else []
    rows += [(b.name, b.value) for b in ordered.buffers if isinstance(b, Hoisted)]
    rows += [(p.name, p.init) for p in ordered.params]
    assert [f"{name}: {chain_order(chain)}" for name, value in rows for chain in chains(value)] == SPEC_CHAINS[
        spec.stem
    ]


def test_the_sizes_an_order_assumed_are_recorded_only_when_they_decided_something() -> None:
    def estimates(body: str) -> tuple[tuple[str, int], ...]:
        source = 'adapter t "T"\n' + body
        return order(check(parse(source, "t.adapter"), source, "t.adapter")).estimates

    lora = "hyper r: int = 8\nparam A[r, d_in] = kaiming\nparam B[d_out, r] = zeros\n"
    assert estimates(lora + "output y + 2 * B @ A @ x\n") == (("d_in", 4096), ("d_out", 4096), ("r", 8))
    assert estimates(lora + "output y + B @ A @ x\n") == ()  # no scalar to place, no product to order
    source = CHAIN.replace("small: int = 2", "small: int = 3")
    assert order(check(parse(source, "c.adapter"), source, "c.adapter")).estimates == (
        ("big", 1024),
        ("d_in", 4096),
        ("d_out", 4096),
        ("small", 3),
    )


def test_the_order_pass_names_every_local_of_a_per_token_chain() -> None:
    """Locals are named after what they hold; emit prints them and allocates none."""

    def forward_chains(body: str) -> list[TokenChain]:
        source = 'adapter t "T"\nhyper r: int = 8\nparam A[r, d_in] = kaiming\nparam B[d_out, r] = zeros\n' + body
        return chains(order(check(parse(source, "t.adapter"), source, "t.adapter")).forward)

    (lora,) = forward_chains("output y + 2 * B @ A @ x\n")
    assert (lora.source_temp, [(a.result, a.temp) for a in lora.steps]) == ("", [("sAx", ""), ("BsAx", "")])
    # An input that is an expression gets a line of its own (h); a factor that is one gets M.
    (chain,) = forward_chains("param g[d_in] = ones\noutput y + (B + 0 * B) @ A @ (g * x)\n")
    assert (chain.source_temp, [(a.result, a.temp) for a in chain.steps]) == ("h", [("Ah", ""), ("MAh", "M")])
    # Two chains in one method never share a local.
    first, second = forward_chains("output y + B @ A @ x + B @ A @ x\n")
    assert [a.result for a in first.steps] == ["Ax", "BAx"] and [a.result for a in second.steps] == ["Ax2", "BAx2"]
