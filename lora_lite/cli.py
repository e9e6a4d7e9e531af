"""The `lora-lite` command."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

EXIT_CODES = """exit codes:
  0  success
  1  a spec does not compile (diagnostics on stderr)
  2  bad command line, or an output folder compile must not write into (the message says why)
  3  --check: generated/ is stale (a summary and diff on stderr)
  4  export-peft: the base or adapter cannot be read, they do not fit, or PEFT's format cannot hold the variant
  5  verify: a check failed (the table says which and why)
  6  merge: the base or adapter cannot be read, they do not fit, or the variant cannot be merged"""


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
    comp.add_argument(
        "--no-cache",
        action="store_true",
        help="read and write no cached modules: compile every spec (a cached module is keyed by the spec's bytes "
        "and every compiler, grammar and template file: see lora_lite.compiler.cache)",
    )
    ver = commands.add_parser(
        "verify",
        help="run this project's shared checks on your variant, on a tiny built-in model",
        description="Compile SPEC (a .adapter file) or import MODULE (a generated module, e.g. mygen.rslora) and "
        "run the checks every built-in variant passes: identity at init, gradients reach every adapter tensor "
        "and nothing else, training changes the output, save/load exact, detach bit-exact, bf16 adapters move, "
        "torch.compile fullgraph. The model is a two-layer MLP (12 -> 20 -> 8); every linear layer is a target.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ver.add_argument("target", metavar="SPEC_OR_MODULE", help="a .adapter file, or an importable module name")
    ver.add_argument("--hyper", action="append", default=[], metavar="NAME=VALUE", help="set a hyper (repeatable)")
    ver.add_argument("--lr", type=float, default=1e-4, help="learning rate of the bf16 check (1e-4)")
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
        "--methods",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        help="comma-separated variant titles: only their rows and PEFT's twins (with the controls and full "
        "fine-tuning in the accuracy run), e.g. --methods LoRA,VB-LoRA",
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
    mrg = commands.add_parser(
        "merge",
        help="fold an adapter into its base: a plain checkpoint that loads without lora-lite",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mrg.add_argument("adapter", type=Path, help="adapter file written by lora_lite.save (.safetensors)")
    mrg.add_argument("--base", type=Path, required=True, help="local base model folder (save_pretrained)")
    mrg.add_argument("-o", "--out", type=Path, required=True, help="output folder for the merged checkpoint")
    args = parser.parse_args(argv)
    if args.command == "merge":
        return _merge(args.adapter, args.base, args.out)
    if args.command == "export-peft":
        return _export_peft(args.adapter, args.base, args.out)
    if args.command == "compile":
        if argv is None:
            # lora-lite is the program, and exits after the compile, which leaves no garbage cycles worth
            # collecting: with the cyclic collector off, the exit does not walk every object allocated (Lark's and
            # Jinja's modules and tables, the AST and IR), about 5% of a cold `compile --check`'s CPU time (paired runs;
            # pausing it during the compile alone saved nothing). Called from Python, main(argv) leaves it alone.
            gc.disable()
        return _compile(args.paths, args.out, args.check, not args.no_cache)
    if args.command == "verify":
        return _verify(args.target, args.hyper, args.lr)
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
            methods=args.methods,
        )
    if args.steps < 1:
        print(f"lora-lite demo: --steps must be at least 1, not {args.steps}", file=sys.stderr)
        return 2
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
    def export(model) -> str:
        import lora_lite as ll
        from lora_lite.peft_interop import export_peft

        ll.load(model, adapter)
        export_peft(model, out)
        return f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}"

    return _on_base("export-peft", 4, adapter, base, export)


def _merge(adapter: Path, base: Path, out: Path) -> int:
    def merge(model) -> str:
        from lora_lite.merging import merge_checkpoint

        merge_checkpoint(model, adapter, base, out)
        return f"wrote a merged checkpoint to {out}/ (loads with transformers' from_pretrained, no lora-lite needed)"

    return _on_base("merge", 6, adapter, base, merge)


def _on_base(command: str, code: int, adapter: Path, base: Path, action) -> int:
    """Load the base model folder the adapter file was trained on and run `action(model)`, which returns
    what to print; a missing path exits 2, anything that cannot be loaded or done exits `code`."""
    missing = [str(p) for p in (adapter, base) if not p.exists()]
    if missing:
        print(f"lora-lite {command}: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(f"lora-lite {command}: needs transformers (pip install 'lora-lite[demo]')", file=sys.stderr)
        return code
    try:
        model = _load_base(base, adapter)
    except (OSError, ValueError, KeyError) as exc:
        print(f"lora-lite {command}: cannot load the base model from {base}: {exc}", file=sys.stderr)
        return code
    try:
        print(action(model))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"lora-lite {command}: {exc}", file=sys.stderr)
        return code
    return 0


def _load_base(base: Path, adapter: Path):
    """The base model class the adapter's targets live in: the config's `architectures`, then the Auto classes.

    An adapter saved on `GPT2LMHeadModel` names `transformer.h.0.attn.c_attn`, which `AutoModel`
    (GPT2Model) calls `h.0.attn.c_attn`: the first class whose modules hold every target is taken.
    Raises ValueError when the adapter file is unreadable or no class fits.
    """
    import json

    import transformers

    from lora_lite.runtime import _read

    metadata, _ = _read(adapter)
    targets = json.loads(metadata["targets"])
    config = transformers.AutoConfig.from_pretrained(str(base), local_files_only=True)
    names = list(getattr(config, "architectures", None) or []) + [
        "AutoModelForCausalLM",
        "AutoModelForSeq2SeqLM",
        "AutoModelForSequenceClassification",
        "AutoModel",
    ]
    tried = []
    for name in dict.fromkeys(names):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(str(base), local_files_only=True, dtype="auto")  # the dtype it was saved in
        except (OSError, ValueError, KeyError):
            continue
        modules = dict(model.named_modules())
        if all(t in modules for t in targets):
            return model
        tried.append(name)
    raise ValueError(
        f"no transformers class for this base has the adapter's targets ({', '.join(targets[:3])}, ...); "
        f"tried {', '.join(tried) or 'none could load it'}"
    )


def _verify(target: str, hyper_args: list[str], lr: float) -> int:
    from lora_lite.compiler.diagnostics import CompileError

    hypers = dict(h.split("=", 1) for h in hyper_args if "=" in h)
    if len(hypers) != len(hyper_args):
        print("lora-lite verify: --hyper takes NAME=VALUE, e.g. --hyper r=4", file=sys.stderr)
        return 2
    if target.endswith(".adapter") and not Path(target).is_file():
        print(f"lora-lite verify: no such file: {target}", file=sys.stderr)
        return 2
    import torch

    from lora_lite import verify

    try:
        variants = verify.variants_of(target)
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ImportError, LookupError, TypeError) as exc:  # TypeError: the module's variant was refused at registration
        print(f"lora-lite verify: {target}: {exc}", file=sys.stderr)
        return 2
    failed = False
    for variant in variants:
        try:
            config = verify.config_factory(variant, hypers)
        except (ValueError, TypeError) as exc:
            print(f"lora-lite verify: {exc}", file=sys.stderr)
            return 2
        cfg = config(torch.float32)
        shown = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in cfg.hyper_fields())
        source = target if target.endswith(".adapter") else variant.__module__
        print(f"{variant.title} from {source}, {type(cfg).__name__}({shown}), on a tiny MLP (12 -> 20 -> 8)")
        outcomes = verify.run(verify.Case(verify.tiny_mlp, config), lr=lr)
        print(verify.table(outcomes))
        failed |= not all(o.ok for o in outcomes)
    return 5 if failed else 0


def _table(paths: list[Path]) -> int:
    from lora_lite.compiler.diagnostics import CompileError
    from lora_lite.compiler.driver import table

    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"lora-lite table: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    try:
        print(table(paths), end="")
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _compile(paths: list[Path], out: Path, check_only: bool, cached: bool = True) -> int:
    import keyword

    from lora_lite.compiler.driver import OWN_GENERATED, build, foreign_files, refused_output, spec_files, stale, write

    start = time.perf_counter()
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"lora-lite compile: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not spec_files(paths):
        print(f"lora-lite compile: no .adapter files in {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    refused = refused_output(paths, out)
    if refused and not check_only:
        print(f"lora-lite compile: {refused}", file=sys.stderr)
        return 2
    own = out.resolve() == OWN_GENERATED.resolve()
    package = "lora_lite.generated" if own else out.resolve().name
    importable = own or (package.isidentifier() and not keyword.iskeyword(package))
    if not importable:
        print(
            f"lora-lite compile: warning: {package!r} is not a Python package name, so its modules cannot be "
            f"imported: name the output folder with letters, digits and _ (-o {_package_name(package)})",
            file=sys.stderr,
        )
    result = build(paths, out, cached)
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
    foreign = foreign_files(result)
    if foreign:
        print(
            f"lora-lite compile: {', '.join(map(str, foreign))}: not written by lora-lite compile (no "
            "'DO NOT EDIT' marker on the first line), and compile would overwrite or delete it: move it away, "
            "or compile into another folder",
            file=sys.stderr,
        )
        return 2
    touched = write(result)
    took = time.perf_counter() - start
    files = f"{len(touched)} file{'' if len(touched) == 1 else 's'} written"
    print(f"compiled {len(result.outputs) - 1} specs into {out}/ ({files}, {took * 1000:.0f} ms)")
    for cls, module in result.index:
        print(f"  {package}.{module}: {cls}, {cls}Config")
    if not own and importable and result.index:  # (a folder that is no package name was warned about above)
        cls, module = result.index[0]
        print(f"import them with {out.resolve().parent} on sys.path: from {package}.{module} import {cls}Config")
    return 0


def _package_name(folder: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in folder) or "generated"
    return name if name.isidentifier() and not name[0].isdigit() else "_" + name


if __name__ == "__main__":
    sys.exit(main())
