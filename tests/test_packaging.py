"""The wheel: one import package, `lora_lite`, that works installed in a fresh venv.

compiler/, generated/, grammar/ and specs/ sit at the top of the repository and
are mapped into `lora_lite` by pyproject.toml; nothing may land in site-packages
under a generic top-level name such as `compiler`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Build outputs and local state that must not leak into the copy the wheel is built from.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "*.safetensors"
)


def _run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built, without network, from a clean copy of the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp / "dist", source, cwd=tmp)
    (built,) = (tmp / "dist").glob("lora_lite-*.whl")
    return built


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lora_lite"}
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["lora_lite"]
    for folder, pattern in [
        ("compiler/templates", "*.jinja"),
        ("grammar", "*.lark"),
        ("specs", "*.adapter"),
        ("generated", "*.py"),
        ("compiler", "*.py"),
    ]:
        expected = {f"lora_lite/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).glob(pattern)}
        assert expected, f"{folder}/{pattern} matches nothing in the repository"
        assert expected <= set(names), f"missing from the wheel: {sorted(expected - set(names))}"
    assert "lora_lite/grammar/adapter.lark" in names


def _fresh_venv(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A venv with the wheel installed; returns (its folder, its site-packages)."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    # The dependencies (torch, lark, ...) come from this venv's site-packages, added as a plain path:
    # site does not run the .pth files of a directory named in a .pth, so this venv's editable
    # lora_lite finder (__editable__.lora_lite-*.pth) stays off there.
    deps = sysconfig.get_paths()["purelib"]
    (site / "dependencies.pth").write_text(deps + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    return venv, site


def test_wheel_works_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv, site = _fresh_venv(wheel, tmp_path)
    python = venv / "bin" / "python"

    work = tmp_path / "cwd"
    work.mkdir()
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        from pathlib import Path

        import torch
        import lora_lite
        import lora_lite.compiler
        from lora_lite.compiler.parse import GRAMMAR

        site = Path({str(site)!r})
        for module in (lora_lite, lora_lite.compiler):
            assert Path(module.__file__).is_relative_to(site), module.__file__
        assert GRAMMAR.is_file() and GRAMMAR.is_relative_to(site), GRAMMAR
        assert not any("__editable__" in str(p) for p in sys.meta_path), sys.meta_path
        for name in ("compiler", "generated", "grammar", "specs"):
            assert importlib.util.find_spec(name) is None, f"top-level {{name}} is importable"

        cfg = lora_lite.LoRAConfig(r=4, target_names="0")
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        assert lora_lite.attach(model, cfg) == ["0"]
        model(torch.randn(2, 8)).sum().backward()
        lora_lite.detach(model)
        print("ok")
        """
    )
    assert _run(python, "-I", "-c", script, cwd=work).strip() == "ok"
    assert "compile" in _run(python, "-I", "-m", "lora_lite.cli", "--help", cwd=work)
    package = site / "lora_lite"
    out = _run(
        venv / "bin" / "lora-lite", "compile", "--check", package / "specs", "-o", package / "generated", cwd=work
    )
    assert "is up to date" in out


# ---------------------------------------------------------------- docs/tutorial.md, walked as a new user

TUTORIAL = ROOT / "docs" / "tutorial.md"
SETUP = ["pip install lora-lite", "mkdir my_project && cd my_project"]  # done here: the wheel, a fresh folder
SHOWN_FOLDER = "/home/me/my_project"


def _tutorial_steps() -> list[tuple[str, str, str]]:
    """The page's steps in order: ("file", path, text) for a block whose first line is `# PATH`, and
    ("run", command, expected stdout) for each `$` line of a console block."""
    steps = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", TUTORIAL.read_text(encoding="utf-8"), re.M | re.S):
        first = body.split("\n", 1)[0]
        if lang in ("python", "adapter") and first.startswith("# "):
            steps.append(("file", first[2:], body))
        elif lang == "console":
            for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
                command, _, output = chunk.partition("\n")
                steps.append(("run", command, output))
    return steps


def _numbers_as_n(text: str) -> list[str]:
    return [re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line.rstrip()) for line in text.strip().splitlines()]


@pytest.mark.slow
def test_tutorial_walks_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv, site = _fresh_venv(wheel, tmp_path)
    project = tmp_path / "my_project"
    project.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    steps = _tutorial_steps()
    assert [step[1] for step in steps[: len(SETUP)]] == SETUP
    assert sum(kind == "run" for kind, _, _ in steps) >= 6 and sum(kind == "file" for kind, _, _ in steps) >= 5
    for kind, what, text in steps[len(SETUP) :]:
        if kind == "file":
            path = project / what
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            continue
        result = subprocess.run(["bash", "-c", what], cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"$ {what}\n{result.stdout}\n{result.stderr}"
        printed = result.stdout.replace(str(project), SHOWN_FOLDER)
        assert _numbers_as_n(printed) == _numbers_as_n(text), f"$ {what} printed\n{printed}\nthe tutorial shows\n{text}"
    assert (project / "mygen" / "rslora.py").read_text(encoding="utf-8").startswith("# Code generated by lora-lite")
    # The hazard: compiling into the installed package's generated/ deleted its modules. Now refused.
    installed = site / "lora_lite" / "generated"
    before = {p.name: p.read_bytes() for p in installed.glob("*.py")}
    command = [venv / "bin" / "lora-lite", "compile", "my_specs", "-o", installed]
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "inside the installed lora-lite package" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in installed.glob("*.py")} == before
    assert len(before) == len(list((ROOT / "specs").glob("*.adapter"))) + 1  # every spec's module and __init__.py
