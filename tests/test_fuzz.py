"""Fuzzing the compiler with hypothesis: grammar-based specs and byte mutations of the real specs.

Properties, checked on every case:
- compiling raises nothing but CompileError (no traceback of another kind, no hang);
- a spec that compiles gives a module that imports; attached to a tiny model it either refuses with a
  ValueError naming the problem, or runs, and detach gives the base back bit for bit;
- the specs built to be the identity at init (one-valued gates, zero-initialised factors, residuals
  added back) compile, and the adapted model equals the base at init.

The runs are derandomized (the same cases on every run, so CI is deterministic); the counts go to the
pytest summary ("fuzz: ..."). Mutants that compile may change the math (`1 + elu(g)` -> `1 * elu(g)`
is a valid spec whose layer is not the base at init): for those the identity is counted, not asserted.
"""

from __future__ import annotations

import importlib.util
import re
import string
from pathlib import Path

import pytest
import torch
from conftest import COUNTS, tiny_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_lite as ll
from lora_lite.compiler import compile_source
from lora_lite.compiler.builtins import NAMES as BUILTINS
from lora_lite.compiler.diagnostics import CompileError
from lora_lite.compiler.driver import decode
from lora_lite.variant import Variant

ROOT = Path(__file__).resolve().parent.parent
# Under a name and title of their own: a mutant that changes the math of `lora` is not the built-in LoRA (E104).
SPECS = {
    p.stem: re.sub(rb'adapter (\w+) "', rb'adapter fuzz_\1 "Fuzz ', p.read_bytes(), count=1)
    for p in sorted((ROOT / "specs").glob("*.adapter"))
}
GRAMMAR_CASES = 500
IDENTITY_CASES = 120
MUTANTS_PER_SPEC = 50
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(autouse=True)
def _restore_variant_registry():
    """Fuzzed modules register variants: put the registry back as it was."""
    saved = dict(Variant.registry)
    yield
    Variant.registry.clear()
    Variant.registry.update(saved)


def compile_or_error(source: str, file: str) -> str | None:
    """The generated module, or None for a CompileError; anything else fails the test."""
    try:
        return compile_source(source, file)
    except CompileError as exc:
        assert exc.diagnostics and all(d.code.startswith("E") for d in exc.diagnostics)
        assert str(exc).startswith(f"{file}:")
        return None


def import_module(code: str, tmp: Path, name: str):
    path = tmp / f"{name}.py"
    path.write_text(code, encoding="utf-8")
    for taken in [n for n, v in Variant.registry.items() if v.__module__.startswith("lora_lite_fuzz_")]:
        del Variant.registry[taken]  # each fuzzed module stands alone: the previous one's same name is no clash
    spec = importlib.util.spec_from_file_location(f"lora_lite_fuzz_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not put in sys.modules: nothing outlives the test but the registry entry
    return module


def variant_of(module) -> type[Variant]:
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Variant) and v is not Variant]
    assert len(found) == 1
    return found[0]


def small_config(variant: type[Variant]):
    """The spec's defaults, int hypers capped at 4 so that they fit the tiny model; every linear layer."""
    cls = variant.config_class
    hypers = {f.name: min(f.default, 4) for f in cls.hyper_fields() if f.type in ("int", int)}
    return cls(target_names=None, **hypers)


def run_on_tiny_model(variant: type[Variant], must_be_identity: bool) -> str:
    """Attach to tiny_mlp, run, detach; return the outcome counted in the summary."""
    model = tiny_mlp()
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
    cfg = small_config(variant)
    sizes = [
        s.shape for layer in (model.up, model.down) for s in variant.slots(cfg, layer.in_features, layer.out_features)
    ]
    if any(torch.Size(shape).numel() > 10**6 for shape in sizes):  # a mutated size (`param A[88888, d_in]`)
        assert not must_be_identity, sizes
        return "too large to attach to the tiny model"
    data = [torch.randn(2, 3, 12)] if variant.stats else None
    try:
        ll.attach(model, cfg, calibration_data=data)
    except ValueError as exc:  # a clear refusal (a require, an svd rank, a singular matrix), nothing changed
        assert not must_be_identity, exc
        assert ll.attachment(model) is None
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        return "refused by attach"
    with torch.no_grad():
        adapted = model(x)
    assert adapted.shape == base.shape
    identity = bool(torch.allclose(adapted, base, atol=1e-5, rtol=1e-4))
    if must_be_identity:
        assert identity, (adapted - base).abs().max()
    ll.detach(model)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    return "identity at init" if identity else "not identity (the mutation changed the math)"


# ---------------------------------------------------------------- grammar-based specs (mostly invalid)

IDENT = st.sampled_from(
    ["x", "y", "W", "bias", "d_in", "d_out", "r", "alpha", "A", "B", "g", "U", "S", "Vt", "s", "k", "_", "torch"]
    + ["__import__", "self", "cfg", "lora", "eval", "exec", "os", "None", "True", "λ", "A1", "zeros", "ones"]
    + sorted(BUILTINS)
)
NUMBER = st.sampled_from(["0", "1", "2", "4", "8", "007", "0.5", "1e-3", "1e999", "3.0", "99999999999999999999"])


def expressions() -> st.SearchStrategy[str]:
    leaf = st.one_of(IDENT, NUMBER)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        binop = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "@", "**", "==", "<", "!="]), inner)
        return st.one_of(
            binop.map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            inner.map(lambda e: f"-{e}"),
            inner.map(lambda e: f"({e})"),
            inner.map(lambda e: f"{e}.T"),
            st.tuples(IDENT, st.lists(inner, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        )

    return st.recursive(leaf, extend, max_leaves=12)


TEXT = st.text(alphabet=string.printable + "λ\u2028\x00é", max_size=30)
STRING = TEXT.map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"')


EXPRESSION = expressions()


def statements() -> st.SearchStrategy[str]:
    e = EXPRESSION
    dims = st.lists(e, max_size=3).map(", ".join)
    return st.one_of(
        st.tuples(IDENT, st.sampled_from(["int", "float", "str"]), e).map(lambda t: f"hyper {t[0]}: {t[1]} = {t[2]}"),
        st.tuples(IDENT, dims, e).map(lambda t: f"param {t[0]}[{t[1]}] = {t[2]}"),
        st.tuples(st.lists(IDENT, min_size=1, max_size=3), e).map(lambda t: f"let {', '.join(t[0])} = {t[1]}"),
        st.tuples(IDENT, e).map(lambda t: f"stat {t[0]} = {t[1]}"),
        st.tuples(e, STRING).map(lambda t: f"require {t[0]}: {t[1]}"),
        e.map(lambda t: f"residual {t}"),
        STRING.map(lambda t: f"target {t}"),
        e.map(lambda t: f"output {t}"),
        e.map(lambda t: f"input {t}"),
        TEXT.map(lambda t: "# " + t.replace("\n", " ")),
    )


STATEMENT = statements()


@st.composite
def grammar_specs(draw) -> str:
    name = draw(IDENT)
    title = draw(STRING)
    url = draw(st.sampled_from(["", " https://arxiv.org/abs/1", ' https://x.org/"+__import__("os")+"']))
    doc = draw(st.one_of(st.just(""), TEXT.map(lambda t: '\n"""' + t.replace('"""', "") + '"""')))
    body = draw(st.lists(STATEMENT, max_size=8))
    return f"adapter {name} {title}{url}{doc}\n" + "\n".join(body) + "\n"


def test_grammar_based_specs_raise_only_compile_errors() -> None:
    @settings(FUZZ, max_examples=GRAMMAR_CASES)
    @given(source=grammar_specs())
    def generate(source: str) -> None:
        COUNTS["fuzz: grammar"] += 1
        COUNTS["fuzz: specs run (all kinds), only CompileError raised"] += 1
        if compile_or_error(source, "fuzz.adapter") is not None:
            COUNTS["fuzz: grammar: compiled"] += 1

    before = COUNTS["fuzz: grammar"]
    generate()
    assert COUNTS["fuzz: grammar"] - before >= GRAMMAR_CASES


# ---------------------------------------------------------------- specs built to be the identity at init

ONE_VALUED_OUT = ["g", "g * g", "sqrt(g)", "exp(z)", "(1 + elu(z))", "abs(g)", "max(g, 0.5)", "clamp(g, 0, 2)"]
ONE_VALUED_R = ["ones_r", "(1 + elu(zr))", "exp(zr)", "sqrt(ones_r)"]
ZERO_TERMS = [
    "s * B @ A @ x",
    "B @ diag(h) @ A @ x",
    "B @ A @ (hin * x)",
    "s * B @ (A @ x) * 2",
    "B @ diag(h * lam / r) @ A @ x",
    "detach(B) @ A @ x",
    "s * B @ A @ x + B @ A @ x",
]


@st.composite
def identity_specs(draw) -> str:
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from(["16", "0.5", "r", "2 * r + 1", "r / 2"]))
    lines = [
        f'adapter gen "Generated {draw(st.integers(0, 99))}"',
        f"hyper r: int = {r}",
        f"hyper alpha: float = {alpha}",
        'require r >= 1: "r is positive"',
        "let s = alpha / r",
        "param A[r, d_in] = kaiming",
        "param B[d_out, r] = zeros",
        "param g[d_out] = ones",
        "param z[d_out] = zeros",
        "param h[r] = ones",
        "param hin[d_in] = ones",
        "param lam[] = 3",
    ]
    gate = draw(st.sampled_from(ONE_VALUED_OUT))
    term = draw(st.sampled_from(ZERO_TERMS))
    forward = f"{gate} * y + {term}"
    if draw(st.booleans()):  # an AntiPaSTO-like residual, added back with a one-valued gain
        lines += ["let U, S, Vt = svd(W, r)", "residual W - U @ diag(S) @ Vt", "param ones_r[r] = ones"]
        lines += ["param zr[r] = zeros"]
        forward += f" + U @ diag(S * {draw(st.sampled_from(ONE_VALUED_R))}) @ Vt @ x"
    lines.append(f"output {forward}")
    kept = [line for line in lines if not line.startswith(("param ", "let s")) or _reads(forward, _defined(line))]
    return "\n".join(kept) + "\n"


def _defined(line: str) -> str:
    return line.split()[1].split("[")[0]


def _reads(forward: str, name: str) -> bool:
    return any(token == name for token in forward.replace("(", " ").replace(")", " ").replace(",", " ").split())


def test_specs_built_to_be_identity_compile_import_and_are_identity_at_init(tmp_path: Path) -> None:
    compiled: dict[str, str] = {}

    @settings(FUZZ, max_examples=IDENTITY_CASES)
    @given(source=identity_specs())
    def generate(source: str) -> None:
        COUNTS["fuzz: identity-by-construction"] += 1
        COUNTS["fuzz: specs run (all kinds), only CompileError raised"] += 1
        code = compile_source(source, "gen.adapter")  # valid by construction: a CompileError here is a bug
        compiled.setdefault(code.split('"""\n', 2)[-1], code)

    before = COUNTS["fuzz: identity-by-construction"]
    generate()
    assert COUNTS["fuzz: identity-by-construction"] - before >= IDENTITY_CASES
    for i, code in enumerate(compiled.values()):
        module = import_module(code, tmp_path, f"gen{i}")
        assert run_on_tiny_model(variant_of(module), must_be_identity=True) == "identity at init"
    COUNTS["fuzz: identity-by-construction: distinct modules imported, identity at init"] += len(compiled)


# ---------------------------------------------------------------- byte mutations of the real specs

BYTES = st.one_of(
    st.sampled_from([bytes([c]) for c in b'()[]=:,+-*/@.#"\n\\ _0123456789eTxyWrABg']),
    st.binary(min_size=1, max_size=3),
    st.sampled_from([b'"""', b"\xff", b"\xe2\x80\xa8", b"\x00", b"\r", b"\t", b"__import__", b"zeros", b"ones"]),
)


@st.composite
def mutants(draw, spec: bytes) -> bytes:
    data = bytearray(spec)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        if kind == "replace" and where < len(data):
            data[where : where + 1] = draw(BYTES)
        elif kind == "insert":
            data[where:where] = draw(BYTES)
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 8))]
        else:
            end = min(len(data), where + draw(st.integers(1, 40)))
            data[where:where] = data[where:end]
    return bytes(data)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mutated_real_specs_raise_only_compile_errors_and_compiled_ones_run(name: str, tmp_path: Path) -> None:
    compiled: dict[str, str] = {}

    @settings(FUZZ, max_examples=MUTANTS_PER_SPEC)
    @given(data=mutants(SPECS[name]))
    def mutate(data: bytes) -> None:
        COUNTS["fuzz: mutants"] += 1
        COUNTS["fuzz: specs run (all kinds), only CompileError raised"] += 1
        try:
            source = decode(data, f"{name}.adapter")
        except CompileError:
            COUNTS["fuzz: mutants: not UTF-8 (E001)"] += 1
            return
        code = compile_or_error(source, f"{name}.adapter")
        if code is not None:
            COUNTS["fuzz: mutants compiled"] += 1
            compiled.setdefault(code.split('"""\n', 2)[-1], code)  # the same code but for the docstring: once

    before = COUNTS["fuzz: mutants"]
    mutate()
    assert COUNTS["fuzz: mutants"] - before >= MUTANTS_PER_SPEC
    for i, code in enumerate(compiled.values()):
        module = import_module(code, tmp_path, f"{name}_{i}")
        COUNTS[f"fuzz: mutants: {run_on_tiny_model(variant_of(module), must_be_identity=False)}"] += 1
    COUNTS["fuzz: mutants: distinct modules imported and attached"] += len(compiled)
