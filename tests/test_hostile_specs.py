"""Hostile specs: spec text never runs. Each either fails with a diagnostic or compiles to inert code.

Every payload below would, if any of it were executed, set the environment variable CANARY, create the
file CANARY in the working folder, or set `builtins.CANARY`. The compiled modules are imported, attached
to a tiny model, run and detached; then the canaries are checked. Every generated module (these and the
checked-in ones) imports only torch, lora_lite and the standard library, and never names a builtin that
runs code.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import COUNTS, tiny_mlp

import lora_lite as ll
from lora_lite.compiler import compile_source
from lora_lite.compiler.diagnostics import CompileError
from lora_lite.compiler.driver import decode
from lora_lite.variant import Variant

ROOT = Path(__file__).resolve().parent.parent
RUN = "__import__('os').environ.__setitem__('CANARY', '1') or open('CANARY', 'w') or setattr(__builtins__, 'CANARY', 1)"
SHORT = "open('CANARY', 'w')"
ESCAPED = RUN.replace("(", "\\\\(").replace(")", "\\\\)")  # a valid regex: the parentheses escaped
BODY = "\nhyper r: int = 2\nparam g[d_out] = ones\noutput g * y\n"
DANGEROUS = {"eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "getattr", "setattr"}
DANGEROUS |= {"delattr", "breakpoint", "system", "popen", "environ", "subprocess"}

# name -> (source, outcome): "inert" (compiles; the module is run) or the error code it must give.
HOSTILE: dict[str, tuple[str, str]] = {
    "name __import__": (f'adapter __import__ "T"{BODY}', "E103"),
    "name is a Python builtin": ('adapter t "T"\nparam exec[d_out] = ones\noutput exec * y\n', "E103"),
    "quotes in the title": (rf'adapter t "\" + {RUN} + \""{BODY}', "inert"),
    "single quotes and backslashes in the title": (rf"""adapter t "\\' + {RUN} + '\\"{BODY}""", "inert"),
    "code in the url": (f"adapter t \"T\" https://x.org/'+{RUN.replace(' ', '')}+'{BODY}", "inert"),
    "docstring ending in a backslash": (f'adapter t "T"\n"""\n{RUN} \\"""{BODY}', "inert"),
    "docstring with quotes, braces and escapes": (
        f'adapter t "T"\n"""\n"{RUN}" "" \' \'\'\' {{RUN}} \\x00 \\N{{BULLET}} %s\n"""{BODY}',
        "inert",
    ),
    "text after the docstring closes": (f'adapter t "T"\n"""\n\\""" + {RUN} + \\"""{BODY}', "E001"),
    "control characters and line separators in the docstring": (
        f'adapter t "T"\n"""\n\r{RUN}\x00\x0c\u2028{RUN}\u2029\x85\x1b[2J\n"""{BODY}',
        "inert",
    ),
    "quotes and # in a require message": (
        f'adapter t "T"\nhyper r: int = 2\nrequire r > 1: "\\")\\n{SHORT} # \'\'\' \\"\\"\\""\n'
        "param g[d_out] = ones\noutput g * y\n",
        "inert",
    ),
    "code in the target regex": (f'adapter t "T"\ntarget "q\\"\\\\); {ESCAPED} # \'\'\'|.*"{BODY}', "inert"),
    "a # comment holding code": (f'adapter t "T" # """{RUN}\n{BODY}# {RUN}\n', "inert"),
    "huge int hyper": (
        'adapter t "T"\nhyper r: int = ' + "9" * 290 + "\nparam g[d_out] = ones\noutput g * y\n",
        "inert",
    ),
    "huge float": ('adapter t "T"\nhyper a: float = 1e400\nparam g[d_out] = ones\noutput a * g * y\n', "E203"),
    "number with 5000 digits": (
        'adapter t "T"\nhyper a: float = ' + "7" * 5000 + "\nparam g[d_out] = ones\noutput a * g * y\n",
        "E203",
    ),
    "power that would take forever": (
        'adapter t "T"\nhyper a: float = 2 ** 10 ** 10 ** 10\nparam g[d_out] = ones\noutput a * g * y\n',
        "E203",
    ),
    "power of a layer size that would take forever": (
        'adapter t "T"\nrequire d_in ** 10 ** 10 > 1: "big"\nparam g[d_out] = ones\noutput g * y\n',
        "E304",
    ),
    "unicode lookalike in a name": (
        'adapter t "T"\nhyper r: int = 2\nparam g[d_out] = ones\noutput g * y + 0 * \u0430lpha\n',
        "E001",
    ),
    "fullwidth equals sign": ('adapter t "T"\nparam g[d_out] \uff1d ones\noutput g * y\n', "E001"),
    "unicode title (class name from ascii words)": (f'adapter t "\u0422\u0435st \u00e9 {RUN}"{BODY}', "inert"),
    "title giving the class name None": (f'adapter t "none"{BODY}', "E103"),
    "brackets nested 10,000 deep": (
        'adapter t "T"\nparam g[d_out] = ones\noutput ' + "(" * 10_000 + "g * y" + ")" * 10_000 + "\n",
        "E001",
    ),
    "10,000 unary minus signs": (
        'adapter t "T"\nparam g[d_out] = ones\noutput g * y + ' + "- " * 10_000 + "g * y\n",
        "E001",
    ),
    "a sum of 5,000 terms": ('adapter t "T"\nparam g[d_out] = ones\noutput y' + " + 0 * g * y" * 5_000 + "\n", "E001"),
    "a file of 2,000,000 characters": (f'adapter t "T"{BODY}' + f"# {RUN}\n" * 20_000, "E001"),
    "a long file under the limit": (f'adapter t "T"{BODY}' + "# padding\n" * 24_000, "inert"),
    "bytes that are not UTF-8": ('adapter t "T\udcff"' + BODY, "E001"),
}


@pytest.fixture
def canaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CANARY", raising=False)
    saved = dict(Variant.registry)
    yield tmp_path
    Variant.registry.clear()
    Variant.registry.update(saved)
    assert "CANARY" not in os.environ
    assert not (tmp_path / "CANARY").exists()
    assert not hasattr(builtins, "CANARY")


def compile_hostile(source: str) -> str:
    """Bytes first, as `lora-lite compile` reads a file: lone surrogates stand for bytes that are not UTF-8."""
    return compile_source(decode(source.encode("utf-8", "surrogateescape"), "h.adapter"), "h.adapter")


def imports_of(code: str) -> set[str]:
    tree = ast.parse(code)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            found.add(node.module.split(".")[0])
    return found


def assert_inert(code: str) -> None:
    """Only torch, lora_lite and the standard library are imported; no name or attribute that runs code."""
    assert imports_of(code) <= {"torch", "lora_lite"} | set(sys.stdlib_module_names), imports_of(code)
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            assert node.id not in DANGEROUS, node.id
        elif isinstance(node, ast.Attribute):
            assert node.attr not in DANGEROUS, node.attr


def run_module(code: str, folder: Path) -> None:
    path = folder / "hostile_module.py"
    path.write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("lora_lite_hostile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variant = next(
        v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Variant) and v is not Variant
    )
    assert variant.__doc__ is None or isinstance(variant.__doc__, str)
    assert isinstance(module.__doc__, str)
    model = tiny_mlp()
    cfg = variant.config_class(target_names=None)
    ll.attach(model, cfg)
    with torch.no_grad():
        model(torch.randn(2, 12))
    ll.detach(model)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_spec_fails_with_a_diagnostic_or_compiles_to_inert_code(case: str, canaries: Path) -> None:
    source, outcome = HOSTILE[case]
    COUNTS["hostile specs: tried, nothing ran"] += 1
    if outcome == "inert":
        code = compile_hostile(source)
        assert_inert(code)
        run_module(code, canaries)
        COUNTS["hostile specs: compiled to inert code, imported and run"] += 1
        return
    with pytest.raises(CompileError) as info:
        compile_hostile(source)
    assert outcome in {d.code for d in info.value.diagnostics}, str(info.value)
    report = str(info.value)
    assert "Traceback" not in report and len(report.splitlines()) < 100
    COUNTS["hostile specs: refused with a diagnostic"] += 1


def test_at_least_ten_hostile_specs_of_each_outcome_kind() -> None:
    outcomes = [outcome for _, outcome in HOSTILE.values()]
    assert len(HOSTILE) >= 10 and outcomes.count("inert") >= 5 and len(outcomes) - outcomes.count("inert") >= 5


def test_hostile_file_name_reaches_no_code(canaries: Path) -> None:
    code = compile_source(f'adapter t "T"{BODY}', f'x"""\n{RUN}\n#.adapter')
    assert_inert(code)
    assert RUN not in code
    run_module(code, canaries)


@pytest.mark.parametrize("module", sorted((ROOT / "generated").glob("*.py")), ids=lambda p: p.stem)
def test_checked_in_generated_modules_import_only_torch_lora_lite_and_stdlib(module: Path) -> None:
    assert_inert(module.read_text(encoding="utf-8"))
