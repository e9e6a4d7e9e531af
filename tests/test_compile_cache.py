"""The cache of compiled modules (compiler/cache.py): a hit is what compiling gives, and editing anything the
output depends on (the spec, a compiler module, a template, the grammar, a built-in spec) is a miss.

The edits are made to a copy of the package laid out as a wheel installs it (compiler/, grammar/, generated/,
specs/ inside lora_lite/), imported from PYTHONPATH, so the checkout is never touched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lite.compiler import cache
from lora_lite.compiler.driver import build

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("__pycache__")
ALL = len(list((ROOT / "specs").glob("*.adapter"))) + 1  # entries of a compile of specs/: its modules and index


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A copy of the package as a wheel lays it out; returns the folder to put on PYTHONPATH."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "lora_lite", site / "lora_lite", ignore=IGNORE)
    for folder in ("compiler", "grammar", "generated", "specs"):
        shutil.copytree(ROOT / folder, site / "lora_lite" / folder, ignore=IGNORE)
    shutil.copytree(ROOT / "specs", tmp_path / "myspecs")  # a user's specs: the built-in ones, copied
    return site


def lora_lite(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "LORA_LITE_CACHE": str(site.parent / "cache")}
    command = [sys.executable, "-m", "lora_lite.cli", *args]
    return subprocess.run(command, cwd=site.parent, env=env, capture_output=True, text=True, check=False)


def entries(site: Path) -> set[str]:
    return {p.name for p in (site.parent / "cache" / "compiled").glob("*.txt")}


def test_every_project_module_the_compiler_imports_is_in_the_key() -> None:
    """The files hashed into the key cover every lora_lite module a compile imports, and the templates and
    grammar it reads: a new import of the compiler's that the key missed fails here."""
    code = (
        "import sys; from pathlib import Path; from lora_lite.compiler import cache, driver\n"
        "driver.build([driver.OWN_SPECS], driver.OWN_GENERATED, cached=False)\n"
        "files = {Path(m.__file__).resolve() for n, m in list(sys.modules.items()) if n.startswith('lora_lite')}\n"
        "print('\\n'.join(sorted(map(str, files - set(cache.inputs())))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ""  # imported but not in the key
    names = {p.relative_to(ROOT).as_posix() for p in cache.inputs() if ROOT in p.parents}
    assert {"grammar/adapter.lark", "compiler/templates/module.py.jinja", "generated/__init__.py"} <= names
    assert {f"specs/{p.name}" for p in (ROOT / "specs").glob("*.adapter")} <= names


def test_a_hit_gives_what_compiling_gives() -> None:
    specs, generated = ROOT / "specs", ROOT / "generated"
    build([specs], generated)  # fills the cache (or reads it)
    assert build([specs], generated).outputs == build([specs], generated, cached=False).outputs


@pytest.mark.parametrize(
    ("edited", "text", "misses"),
    [
        ("myspecs/lora.adapter", "# a comment\n", 1),  # only that spec compiles again
        ("lora_lite/specs/lora.adapter", "# a comment\n", ALL),  # a built-in spec: E104 reads it
        ("lora_lite/compiler/names.py", "# a comment\n", ALL),  # every spec, and the index
        ("lora_lite/compiler/templates/module.py.jinja", "{# a comment #}\n", ALL),
        ("lora_lite/grammar/adapter.lark", "// a comment\n", ALL),
        ("lora_lite/_text.py", "# a comment\n", ALL),
    ],
)
def test_editing_an_input_is_a_miss(installed: Path, edited: str, text: str, misses: int) -> None:
    """Edits that leave the output as it is (comments) are misses all the same: the key hashes bytes."""
    first = lora_lite(installed, "compile", "myspecs", "-o", "out")
    assert first.returncode == 0, first.stderr
    before = entries(installed)
    assert len(before) == ALL
    again = lora_lite(installed, "compile", "myspecs", "-o", "out", "--check")
    assert again.returncode == 0, again.stderr
    assert entries(installed) == before  # all hits
    path = installed.parent / edited if edited.startswith("myspecs") else installed / edited
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")
    after = lora_lite(installed, "compile", "myspecs", "-o", "out")
    assert after.returncode == 0, after.stderr
    assert len(entries(installed) - before) == misses


def test_a_template_change_makes_the_cached_output_stale(installed: Path) -> None:
    """The compiled modules follow a template edit: --check fails on the folder compiled before it."""
    specs = installed / "lora_lite" / "specs"
    assert lora_lite(installed, "compile", str(specs), "-o", "out").returncode == 0
    template = installed / "lora_lite" / "compiler" / "templates" / "module.py.jinja"
    template.write_text(template.read_text(encoding="utf-8") + "# a new last line\n", encoding="utf-8")
    run = lora_lite(installed, "compile", str(specs), "-o", "out", "--check")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "differs from the compiled spec (1 lines)" in run.stderr
    assert "+# a new last line" in run.stderr


def test_check_fails_on_a_hand_edited_module_with_every_spec_cached(installed: Path) -> None:
    specs = installed / "lora_lite" / "specs"
    assert lora_lite(installed, "compile", str(specs), "-o", "out").returncode == 0
    assert lora_lite(installed, "compile", str(specs), "-o", "out", "--check").returncode == 0
    module = installed.parent / "out" / "lora.py"
    module.write_text(module.read_text(encoding="utf-8").replace("zeros", "ones", 1), encoding="utf-8")
    run = lora_lite(installed, "compile", str(specs), "-o", "out", "--check")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "out/lora.py: differs from the compiled spec" in run.stderr
    (installed.parent / "out" / "dora.py").unlink()
    run = lora_lite(installed, "compile", str(specs), "-o", "out", "--check")
    assert "out/dora.py: missing" in run.stderr


def test_a_damaged_entry_is_compiled_again(installed: Path) -> None:
    specs = installed / "lora_lite" / "specs"
    assert lora_lite(installed, "compile", str(specs), "-o", "out").returncode == 0
    for entry in (installed.parent / "cache" / "compiled").glob("*.txt"):
        entry.write_bytes(entry.read_bytes().replace(b"zeros", b"ones"))
    run = lora_lite(installed, "compile", str(specs), "-o", "out", "--check")
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_spec_with_errors_is_never_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    cache.cache_dir.cache_clear()
    try:
        spec = tmp_path / "bad.adapter"
        spec.write_text('adapter bad "Bad"\nparam g[d_out] = ones\noutput g * zz\n', encoding="utf-8")
        first, second = (build([spec], tmp_path / "out") for _ in range(2))
        assert second.errors and str(second.errors[0]) == str(first.errors[0])
        stored = [p.read_text(encoding="utf-8") for p in (tmp_path / "cache" / "compiled").glob("*.txt")]
        assert len(stored) == 1 and "VARIANTS" in stored[0]  # the (empty) index only
    finally:
        cache.cache_dir.cache_clear()


def test_the_timing_script_runs() -> None:
    """tools/compile_time.py prints the ratios to the floor and the cold cost's split (no figure is asserted: speed
    is not a test)."""
    script = ROOT / "tools" / "compile_time.py"
    run = subprocess.run(
        [sys.executable, str(script), "-n", "1", "--per-spec", "--against", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "lora-lite compile --check: " in run.stdout and "lora-lite compile --check --no-cache: " in run.stdout
    assert re.search(r"cold, cpu beyond the floor: -?\d+ ms fixed \+ -?[\d.]+ ms per spec", run.stdout), run.stdout
    assert re.search(r"this checkout / HEAD: \d+\.\d{3}", run.stdout), run.stdout


def test_no_cache_reads_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    cache.cache_dir.cache_clear()
    try:
        result = build([ROOT / "specs"], ROOT / "generated", cached=False)
        assert not result.errors and not (tmp_path / "cache" / "compiled").exists()
    finally:
        cache.cache_dir.cache_clear()


def test_nothing_is_stored_when_the_inputs_changed_since_the_process_first_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The passes a process runs are the modules it imported when it first compiled: if the inputs have
    changed since, what it compiles is not stored under the new inputs' key."""
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    cache.cache_dir.cache_clear()
    try:
        monkeypatch.setattr(cache, "_FIRST", "0" * 64)  # as if an input was edited after the first compile
        result = build([ROOT / "specs"], ROOT / "generated")
        assert not result.errors and not (tmp_path / "cache" / "compiled").exists()
        monkeypatch.setattr(cache, "_FIRST", cache.fingerprint())
        assert build([ROOT / "specs"], ROOT / "generated").outputs == result.outputs
        assert len(list((tmp_path / "cache" / "compiled").glob("*.txt"))) == ALL
    finally:
        cache.cache_dir.cache_clear()
