"""The `lora-lite` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_CODES = """exit codes:
  0  success
  1  a spec does not compile (diagnostics on stderr)
  2  bad command line
  3  --check: generated/ is stale (a summary and diff on stderr)
  4  export-peft: the base or adapter cannot be read, they do not fit, or PEFT's format cannot hold the variant"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-lite",
        description="Compile adapter specs and run the embedded demo.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    comp = commands.add_parser(
        "compile",
        help="compile .adapter specs into Python modules",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comp.add_argument("paths", nargs="*", type=Path, default=[Path("specs")], help="spec files or folders (specs/)")
    comp.add_argument("-o", "--out", type=Path, default=Path("generated"), help="output folder (generated/)")
    comp.add_argument("--check", action="store_true", help="change nothing; fail if the output folder is stale")
    tab = commands.add_parser("table", help="print the variants table derived from the specs (markdown)")
    tab.add_argument("paths", nargs="*", type=Path, default=[Path("specs")], help="spec files or folders (specs/)")
    demo = commands.add_parser("demo", help="train, save and load each variant on an embedded tiny model")
    demo.add_argument("--steps", type=int, default=60, help="training steps per variant (60)")
    exp = commands.add_parser(
        "export-peft",
        help="write a lora-lite adapter file as a PEFT adapter folder",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("adapter", type=Path, help="adapter file written by lora_lite.save (.safetensors)")
    exp.add_argument("--base", type=Path, required=True, help="local base model folder (save_pretrained)")
    exp.add_argument("-o", "--out", type=Path, required=True, help="output folder for the PEFT adapter")
    args = parser.parse_args(argv)
    if args.command == "export-peft":
        return _export_peft(args.adapter, args.base, args.out)
    if args.command == "compile":
        return _compile(args.paths, args.out, args.check)
    if args.command == "table":
        return _table(args.paths)
    from lora_lite.demo import run

    return run(steps=args.steps)


def _export_peft(adapter: Path, base: Path, out: Path) -> int:
    missing = [str(p) for p in (adapter, base) if not p.exists()]
    if missing:
        print(f"lora-lite export-peft: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("lora-lite export-peft: needs transformers (pip install 'lora-lite[demo]')", file=sys.stderr)
        return 4
    import lora_lite as ll
    from lora_lite.peft_interop import export_peft

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        print(f"lora-lite export-peft: cannot load the base model from {base}: {exc}", file=sys.stderr)
        return 4
    try:
        ll.load(model, adapter)
        export_peft(model, out)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lora-lite export-peft: {exc}", file=sys.stderr)
        return 4
    print(f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
    return 0


def _table(paths: list[Path]) -> int:
    from lora_lite.compiler.diagnostics import CompileError
    from lora_lite.compiler.driver import table

    try:
        print(table(paths), end="")
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _compile(paths: list[Path], out: Path, check_only: bool) -> int:
    from lora_lite.compiler.driver import build, spec_files, stale, write

    start = time.perf_counter()
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"lora-lite compile: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not spec_files(paths):
        print(f"lora-lite compile: no .adapter files in {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    result = build(paths, out)
    for error in result.errors:
        print(error, file=sys.stderr)
    if result.errors:
        return 1
    if check_only:
        problems = stale(result)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            print("generated code is stale: run `lora-lite compile`", file=sys.stderr)
            return 3
        print(f"{out}/ is up to date ({len(result.outputs) - 1} specs)")
        return 0
    touched = write(result)
    took = time.perf_counter() - start
    print(f"compiled {len(result.outputs) - 1} specs into {out}/ ({len(touched)} files written, {took * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
