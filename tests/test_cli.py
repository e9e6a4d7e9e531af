"""`lora-lite compile`: what it writes, what --check reports, its exit codes (0 ok, 1 spec error, 2 usage, 3 stale)."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lite.cli import main

ROOT = Path(__file__).resolve().parent.parent
SPEC_NAMES = sorted(p.stem for p in (ROOT / "specs").glob("*.adapter"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of specs/ and generated/ to break."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    shutil.copytree(ROOT / "generated", tmp_path / "generated", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def compile_check(tree: Path) -> int:
    return main(["compile", "--check", str(tree / "specs"), "-o", str(tree / "generated")])


def test_compile_writes_one_module_per_spec_and_an_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["compile", str(ROOT / "specs"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{name}.py" for name in SPEC_NAMES] + ["__init__.py"])
    for module in out.iterdir():
        assert module.read_text(encoding="utf-8") == (ROOT / "generated" / module.name).read_text(encoding="utf-8")
    assert f"compiled {len(SPEC_NAMES)} specs into {out}/" in capsys.readouterr().out


def test_compile_writes_only_what_changed(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compile", str(tree / "specs"), "-o", str(tree / "generated")]
    assert main(args) == 0
    assert "(0 files written" in capsys.readouterr().out
    module = tree / "generated" / "lora.py"
    module.write_text(module.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")  # marker kept: ours
    assert main(args) == 0
    assert "(1 file written" in capsys.readouterr().out
    assert (tree / "generated" / "lora.py").read_text(encoding="utf-8") == (ROOT / "generated" / "lora.py").read_text(
        encoding="utf-8"
    )


def test_check_passes_on_the_committed_tree(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["compile", "--check"]) == 0
    assert "generated/ is up to date" in capsys.readouterr().out


def test_check_reports_an_edited_module_with_a_diff(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tree / "generated" / "lora.py"
    edited = module.read_text(encoding="utf-8").replace("return y + BsAx", "return y + 2 * BsAx")
    module.write_text(edited, encoding="utf-8")
    assert compile_check(tree) == 3
    err = capsys.readouterr().err
    assert f"{module}: differs from the compiled spec (2 lines)" in err
    assert "-        return y + 2 * BsAx" in err and "+        return y + BsAx" in err
    assert "run `lora-lite compile`" in err
    assert module.read_text(encoding="utf-8") == edited  # --check changes nothing


def test_check_lists_an_orphan_module(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "specs" / "ia3.adapter").unlink()
    assert compile_check(tree) == 3
    err = capsys.readouterr().err
    assert f"{tree / 'generated' / 'ia3.py'}: generated, but its spec is gone" in err
    assert f"{tree / 'generated' / '__init__.py'}: differs" in err  # the index still lists IA3
    assert (tree / "generated" / "ia3.py").exists()
    # Compiling for real deletes the orphan and leaves the tree up to date.
    assert main(["compile", str(tree / "specs"), "-o", str(tree / "generated")]) == 0
    assert not (tree / "generated" / "ia3.py").exists()
    assert compile_check(tree) == 0


def test_check_reports_a_missing_module(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "generated" / "dora.py").unlink()
    assert compile_check(tree) == 3
    assert f"{tree / 'generated' / 'dora.py'}: missing" in capsys.readouterr().err


@pytest.mark.parametrize("enabled", [True, False])
def test_compile_called_from_python_leaves_the_garbage_collector_alone(tree: Path, enabled: bool) -> None:
    (gc.enable if enabled else gc.disable)()
    try:
        assert compile_check(tree) == 0
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_compile_as_the_program_turns_the_garbage_collector_off() -> None:
    """Run as a program (main() reads sys.argv), compile leaves the collector off for the exit."""
    code = "import gc, sys; from lora_lite.cli import main; sys.argv[1:] = ['compile', '--check']; "
    code += "code = main(); print(code, gc.isenabled())"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "0 False"


def test_a_bad_spec_exits_1_with_a_diagnostic(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tree / "specs" / "lora.adapter"
    spec.write_text(spec.read_text(encoding="utf-8").replace("B @ A @ x", "B @ B @ x"), encoding="utf-8")
    assert main(["compile", str(tree / "specs"), "-o", str(tree / "generated")]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^{re.escape(str(spec))}:20:\d+: error\[E201\]: cannot multiply", err, re.MULTILINE), err
    assert re.search(r"^ +20 \| output y \+ s \* B @ B @ x$", err, re.MULTILINE), err
    assert re.search(r"^ +\| +\^+$", err, re.MULTILINE), err
    assert "Traceback" not in err
    # Nothing is written when a spec fails.
    assert (tree / "generated" / "lora.py").read_text(encoding="utf-8") == (ROOT / "generated" / "lora.py").read_text(
        encoding="utf-8"
    )


def test_a_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tmp_path / "nowhere.adapter")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_folder_without_specs_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(tmp_path)]) == 2
    assert "no .adapter files" in capsys.readouterr().err


def test_an_unknown_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compile", "--frobnicate"])
    assert info.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"]])
def test_help_lists_the_exit_codes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for line in ("0  success", "1  a spec does not compile", "2  bad command line", "3  --check: generated/ is stale"):
        assert line in out


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_check_as_a_subprocess() -> None:
    result = run_python("-m", "lora_lite.cli", "compile", "--check")
    assert result.returncode == 0, result.stderr
    assert "generated/ is up to date" in result.stdout


def test_compile_does_not_import_torch() -> None:
    code = (
        "import sys; from lora_lite.cli import main; "
        "assert main(['compile', '--check']) == 0; "
        "assert 'torch' not in sys.modules, 'lora-lite compile imported torch'"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr


def test_compiling_one_spec_keeps_the_other_modules_and_the_index(tree: Path) -> None:
    assert main(["compile", str(tree / "specs" / "lora.adapter"), "-o", str(tree / "generated")]) == 0
    assert sorted(p.stem for p in (tree / "generated").glob("*.py") if p.stem != "__init__") == SPEC_NAMES
    index = (tree / "generated" / "__init__.py").read_text(encoding="utf-8")
    assert index == (ROOT / "generated" / "__init__.py").read_text(encoding="utf-8")


def test_two_specs_with_the_same_class_name_exit_1(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = (tree / "specs" / "lora.adapter").read_text(encoding="utf-8")
    (tree / "specs" / "lora2.adapter").write_text(source.replace("adapter lora ", "adapter lora2 "), encoding="utf-8")
    assert compile_check(tree) == 1
    assert "also gives the class name 'LoRA'" in capsys.readouterr().err


def test_readme_variants_table_is_the_table_command_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table", str(ROOT / "specs")]) == 0
    printed = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- lora-lite table -->\n", 1)[1].split("<!-- end lora-lite table -->", 1)[0]
    assert block == printed
    assert printed.count("\n| [") == len(SPEC_NAMES)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'adapter t "caf\xe9"\nparam g[d_out] = ones\noutput g * y\n',
            "the spec is not UTF-8 text: byte 0xe9 at line 1, column 15",
        ),
        (b"#" * 1_000_001, "spec file is 1000001 bytes; the limit is 250000 characters"),
    ],
    ids=["latin-1", "oversized"],
)
def test_an_unreadable_spec_file_exits_1_with_a_diagnostic(
    tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t.adapter").write_bytes(content)
    assert main(["compile", str(tmp_path / "t.adapter"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "t.adapter:1:" in err and f"error[E001]: {message}" in err and "Traceback" not in err
