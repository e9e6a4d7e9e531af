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
        description="Compile adapter specs, run the embedded benchmark and the GSM8K harness.",
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
    bench = commands.add_parser(
        "bench",
        help="benchmark every variant, PEFT's same methods and a full fine-tune on an embedded task",
    )
    bench.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (for tests)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON and the plot")
    bench.add_argument("--cache", type=Path, help="pretrained-base cache ($LORA_LITE_CACHE, ~/.cache/lora-lite)")
    bench.add_argument("--profile", action="store_true", help="profile train steps of LoRA, DoRA and HRA (ours, PEFT)")
    bench.add_argument(
        "--speed", action="store_true", help="train step, init time and memory vs PEFT on Qwen3-0.6B's layer shapes"
    )
    bench.add_argument(
        "--device", default="cpu", help="with --speed: cpu, or cuda for the seed's geometry (28 layers, bf16, 4 x 512)"
    )
    gsm = commands.add_parser(
        "gsm8k",
        help="the seed's benchmark: train a variant on MetaMathQA, test on GSM8K (a GPU for the real run)",
    )
    gsm.add_argument("--model", required=True, help="hub id or local folder (AutoModelForCausalLM)")
    gsm.add_argument("--variant", required=True, help="variant title, e.g. LoRA, IA3-FF, AntiPaSTO")
    gsm.add_argument("--train", default="meta-math/MetaMathQA", help="hub id or .json/.jsonl (query, response)")
    gsm.add_argument("--test", default="openai/gsm8k", help="hub id or .json/.jsonl (question, answer)")
    gsm.add_argument("--val", help="validation records (default: GSM8K train split, or the first --n-val of --test)")
    gsm.add_argument("--steps", type=int, default=5000, help="training steps (5000)")
    gsm.add_argument("--batch", type=int, default=4, help="batch size (4)")
    gsm.add_argument("--lr", type=float, help="learning rate (default: the seed's for the variant)")
    gsm.add_argument("--r", type=int, default=32, help="rank for the LoRA family (32)")
    gsm.add_argument("--alpha", type=float, default=64.0, help="alpha for the LoRA family (64)")
    gsm.add_argument("--val-every", type=int, default=250, help="validate every N steps (250)")
    gsm.add_argument("--n-val", type=int, default=50, help="validation records (50)")
    gsm.add_argument("--n-test", type=int, help="test records (default: all)")
    gsm.add_argument("--max-length", type=int, default=768, help="max training sequence length in tokens (768)")
    gsm.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens per answer (256)")
    gsm.add_argument("--eval-batch", type=int, default=16, help="generation batch size (16)")
    gsm.add_argument("--quant", choices=["4bit", "8bit"], help="load the base quantized with bitsandbytes (CUDA)")
    gsm.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16)")
    gsm.add_argument("--seed", type=int, default=0)
    gsm.add_argument("--results", type=Path, default=Path("gsm8k_results.tsv"), help="TSV to append to (+ .jsonl)")
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
    if args.command == "gsm8k":
        return _gsm8k(args)
    if args.command == "bench":
        from lora_lite.bench.embedded import run as bench

        return bench(
            quick=args.quick,
            out=args.out,
            cache=args.cache,
            profile=args.profile,
            speed_only=args.speed,
            device=args.device,
        )
    from lora_lite.demo import run

    return run(steps=args.steps)


def _gsm8k(args: argparse.Namespace) -> int:
    from lora_lite.bench.gsm8k import HarnessConfig, HarnessError, run

    names = [
        "model", "variant", "train", "test", "val", "steps", "batch", "lr", "r", "alpha", "val_every", "n_val",
        "n_test", "max_length", "max_new_tokens", "eval_batch", "quant", "dtype", "seed", "results",
    ]  # fmt: skip
    if args.steps < 1 or args.batch < 1 or args.val_every < 1:
        print("lora-lite gsm8k: --steps, --batch and --val-every must be at least 1", file=sys.stderr)
        return 2
    try:
        run(HarnessConfig(**{name: getattr(args, name) for name in names}))
    except HarnessError as exc:
        print(f"lora-lite gsm8k: {exc}", file=sys.stderr)
        return 2
    return 0


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
