"""How long `lora-lite compile --check` takes against the floor, `python -c 'import lark, jinja2'`.

    python tools/compile_time.py            # from the repository root: compile --check of specs/ -> generated/
    python tools/compile_time.py -n 41 -- compile --check path/to/specs -o path/to/generated
    python tools/compile_time.py --per-spec  # also: the cold compile's cost split into fixed and per spec
    python tools/compile_time.py --against main  # also: the cold compile by main's compiler and by this one

Each command runs as a whole process with this interpreter, in turn with the floor (A B A B ...), after one
warm-up run each; printed are the medians of each one's wall and CPU time and of the ratios pair by pair (the
machine's speed drifts less within a pair). Compiled modules come from the cache (compiler/cache.py) once
the warm-up has filled it; `--no-cache` compiles every spec. The lora_lite it times is the one this
interpreter imports: run it with an installed copy on PYTHONPATH to time that. Its .pyc files are written first
where missing, as an install writes them (`--source`: not).

`--per-spec` also times `compile --check --no-cache` of specs/'s first spec alone: the difference to all of
them, per spec, is the cost of one more spec, the rest beyond the floor is fixed (imports, parser and template
loading), and from those two it prints the ratio expected for more specs. It also times parsing every spec and
nothing else: the part of the cold compile that Lark's parser and the AST builder take.

`--against REV` also times the cold compile of specs/ by REV's compiler and by this checkout's, both laid out as
installed copies with their bytecode, in turn with the floor: how much a change saved, on a noisy machine.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

FLOOR = [sys.executable, "-c", "import lark, jinja2"]
CLI = [sys.executable, "-c", "import sys; from lora_lite.cli import main; sys.exit(main())"]
PARSE_ONLY = [
    sys.executable,
    "-c",
    "from pathlib import Path; from lora_lite.compiler.driver import read_source, spec_files; "
    "from lora_lite.compiler.parse import parse; [parse(read_source(p), str(p)) for p in spec_files([Path('specs')])]",
]


def run(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + sys) of one run; raises when it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}: {process.stderr.read().decode()}")
    process.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def paired(command: list[str], runs: int) -> dict[str, float]:
    """Medians over `runs` pairs (command, floor) after one warm-up each."""
    run(command), run(FLOOR)
    pairs = [(run(command), run(FLOOR)) for _ in range(runs)]
    return {
        "wall": statistics.median(a[0] for a, _ in pairs),
        "cpu": statistics.median(a[1] for a, _ in pairs),
        "floor wall": statistics.median(b[0] for _, b in pairs),
        "floor cpu": statistics.median(b[1] for _, b in pairs),
        "wall ratio": statistics.median(a[0] / b[0] for a, b in pairs),
        "cpu ratio": statistics.median(a[1] / b[1] for a, b in pairs),
    }


def per_spec_split(runs: int) -> None:
    """The cold compile's cpu time beyond the floor, split into a fixed part and a part per spec, and the share of
    it that parsing alone takes. Each round runs all four commands (so the machine's drift hits them alike):
    all specs, specs/'s first spec alone, parsing every spec into its AST only (Lark and the AST builder, no
    checks, no printing), and the floor; printed are medians of each round's differences."""
    specs = sorted(Path("specs").glob("*.adapter"))
    commands = {
        "all": [*CLI, "compile", "--check", "--no-cache"],
        "one": [*CLI, "compile", "--check", "--no-cache", str(specs[0])],
        "parse": PARSE_ONLY,
        "floor": FLOOR,
    }
    for command in commands.values():
        run(command)
    rounds = [{name: run(command)[1] for name, command in commands.items()} for _ in range(runs)]
    floor = statistics.median(r["floor"] for r in rounds)
    per_spec = statistics.median((r["all"] - r["one"]) / (len(specs) - 1) for r in rounds)
    fixed = statistics.median(r["one"] - r["floor"] for r in rounds) - per_spec
    parse = statistics.median(r["parse"] - r["floor"] for r in rounds)
    one = statistics.median(r["one"] for r in rounds)
    expected = ", ".join(f"{n} specs {(floor + fixed + n * per_spec) / floor:.2f}x" for n in (28, 40))
    print(
        f"cold, cpu beyond the floor: {fixed * 1000:.0f} ms fixed + {per_spec * 1000:.2f} ms per spec "
        f"({specs[0].name} alone: {one * 1000:.0f} ms); expected ratio at {expected}"
    )
    print(
        f"of which parsing the {len(specs)} specs alone (Lark and the AST, no checks, no printing): "
        f"{parse * 1000:.0f} ms, {(floor + parse) / floor:.2f}x the floor"
    )


def bytecode() -> str:
    """Whether the compiler's modules load from bytecode (.pyc) or are compiled from source in each process."""
    spec = importlib.util.find_spec("lora_lite.compiler.driver")
    cached = Path(spec.cached) if spec and spec.cached else None
    if cached is not None and cached.exists() and cached.stat().st_mtime >= Path(spec.origin).stat().st_mtime:
        return f"from bytecode ({cached.parent})"
    why = "PYTHONDONTWRITEBYTECODE is set" if sys.dont_write_bytecode else "none written yet"
    return f"from source: no .pyc ({why}; `python -m compileall` writes them)"


def write_bytecode() -> str:
    """Write the .pyc files of lora_lite and its compiler where they are missing or stale, as `pip install`
    does for an installed copy (an editable one under PYTHONDONTWRITEBYTECODE never gets them, and then each
    process compiles the compiler's source again); the line saying so."""
    before = bytecode()
    if before.startswith("from bytecode"):
        return before
    for package in ("lora_lite", "lora_lite.compiler"):
        compileall.compile_dir(Path(importlib.util.find_spec(package).origin).parent, quiet=1)
    return f"{bytecode()}, written now (there were none; `--source` times it without them)"


# Where pyproject.toml maps the repository's folders inside the lora_lite package.
PACKAGE_DIRS = {"lora_lite": "lora_lite", "compiler": "lora_lite/compiler", "generated": "lora_lite/generated"}
PACKAGE_DIRS |= {"grammar": "lora_lite/grammar", "specs": "lora_lite/specs"}


def installed_copy(tree: Path, into: Path) -> Path:
    """The package folders of a checkout laid out as an install lays them out, with their bytecode."""
    for folder, target in PACKAGE_DIRS.items():
        shutil.copytree(tree / folder, into / target, ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(into, quiet=1)
    return into


def compile_with(copy: Path) -> list[str]:
    """`lora-lite compile --check --no-cache` run with the lora_lite of `copy` (an editable install's finder,
    which would find this checkout's first, is set aside)."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
        f"sys.path.insert(0, {str(copy)!r}); from lora_lite.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code, "compile", "--check", "--no-cache"]


def against(revision: str, runs: int) -> None:
    """The cold compile of specs/ by the compiler of `revision` and by this checkout's, each run in turn with the
    floor (same round, same drift): medians of their cpu time and of each one's ratio to the floor."""
    with tempfile.TemporaryDirectory() as folder:
        base_tree = Path(folder) / "tree"
        archive = subprocess.run(["git", "archive", revision], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12, 3.11.4
            tar.extractall(base_tree, **safe)
        commands = {
            revision: compile_with(installed_copy(base_tree, Path(folder) / "base")),
            "this checkout": compile_with(installed_copy(Path.cwd(), Path(folder) / "this")),
            "floor": FLOOR,
        }
        for command in commands.values():
            run(command)
        rounds = [{name: run(command)[1] for name, command in commands.items()} for _ in range(runs)]
    floor = statistics.median(r["floor"] for r in rounds)
    print(f"compile --check --no-cache of specs/, {runs} rounds (each: {revision}, this checkout, floor), medians:")
    for name in (revision, "this checkout"):
        ratio = statistics.median(r[name] / r["floor"] for r in rounds)
        print(f"  {name}: {statistics.median(r[name] for r in rounds) * 1000:.0f} ms cpu, {ratio:.2f}x the floor")
    change = statistics.median(r["this checkout"] / r[revision] for r in rounds)
    print(f"  floor {floor * 1000:.0f} ms cpu; this checkout / {revision}: {change:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--runs", type=int, default=21, help="pairs per command (21)")
    parser.add_argument("--per-spec", action="store_true", help="split the cold cost into fixed and per spec")
    parser.add_argument("--source", action="store_true", help="leave missing .pyc files missing")
    parser.add_argument("--against", metavar="REV", help="time the cold compile of REV's compiler against this one")
    parser.add_argument("args", nargs="*", default=["compile", "--check"], help="lora-lite's arguments")
    options = parser.parse_args()
    if (options.per_spec or options.against) and options.args != ["compile", "--check"]:
        parser.error("--per-spec and --against time specs/ -> generated/: give no lora-lite arguments")
    spec = importlib.util.find_spec("lora_lite")
    loads = bytecode() if options.source else write_bytecode()
    print(f"lora_lite from {Path(spec.origin).parent}; its compiler loads {loads}")
    print(f"{options.runs} pairs each, medians; floor: python -c 'import lark, jinja2'")
    for args in (options.args, [*options.args, "--no-cache"]):
        m = paired(CLI + args, options.runs)
        print(
            f"lora-lite {' '.join(args)}: {m['wall'] * 1000:.0f} ms wall, {m['cpu'] * 1000:.0f} ms cpu; floor "
            f"{m['floor wall'] * 1000:.0f} ms, {m['floor cpu'] * 1000:.0f} ms; ratio {m['wall ratio']:.2f}x wall, "
            f"{m['cpu ratio']:.2f}x cpu"
        )
    if options.per_spec:
        per_spec_split(options.runs)
    if options.against:
        against(options.against, options.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
