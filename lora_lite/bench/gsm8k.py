"""`lora-lite gsm8k`: the seed's benchmark, train on MetaMathQA and test on GSM8K.

The model loads with `transformers.AutoModelForCausalLM` (a hub id or a local
folder; optionally 4-bit or 8-bit through bitsandbytes), the data with
`datasets.load_dataset` (hub ids, or local .json/.jsonl files with the same
fields: MetaMathQA `query`/`response`, GSM8K `question`/`answer`). Prompts use
PEFT's MetaMathQA template (the seed validates "the same way PEFT does"):
`Question: {query} Think step by step.\\nAnswer:`, the response follows after a
space. Defaults are the seed's: r=32, alpha=64 (the LoRA family; the gain
family, IA3 and AntiPaSTO, keeps its spec defaults), the spec's targets
(q_proj/v_proj for most), 5k steps of batch 4, learning rate 5e-3 for
IA3/IA3-FF/AntiPaSTO, 1e-3 for DeLoRA and 1e-4 otherwise, cosine schedule,
gradient clipping at 1.0. Accuracy: greedy generation, the answer after `####`
(else the last number) compared exactly with GSM8K's. Each run appends one row
to a TSV file and its full record to a JSON-lines file beside it.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lora_lite.bench import core
from lora_lite.bench.methods import family, ours, seed_lr

TEMPLATE = "Question: {query} Think step by step.\nAnswer:"
TSV_COLUMNS = [
    "date",
    "git_commit",
    "model",
    "variant",
    "quant",
    "steps",
    "batch",
    "lr",
    "hypers",
    "trainable_params",
    "test_accuracy",
    "n_test",
    "best_val_accuracy",
    "peak_cuda_gb",
    "train_seconds",
    "eval_seconds",
    "device",
]


class HarnessError(ValueError):
    """Bad input to the harness (unknown variant, unreadable data or model): said plainly, no traceback."""


@dataclass
class HarnessConfig:
    model: str
    variant: str
    train: str = "meta-math/MetaMathQA"
    test: str = "openai/gsm8k"
    val: str | None = None  # default: GSM8K's train split (hub), else the first n_val test records
    steps: int = 5000
    batch: int = 4
    lr: float | None = None  # default: the seed's rate for the variant's family
    r: int = 32
    alpha: float = 64.0
    val_every: int = 250
    n_val: int = 50
    n_test: int | None = None  # default: every test record
    max_length: int = 768
    max_new_tokens: int = 256
    eval_batch: int = 16
    quant: str | None = None  # "4bit" or "8bit"
    dtype: str = "bfloat16"
    seed: int = 0
    results: Path = Path("gsm8k_results.tsv")
    hypers: dict = field(default_factory=dict)  # filled in: the adapter config used


def run(cfg: HarnessConfig) -> dict:
    """Train one variant, validate every `val_every` steps, test; append the result; return the record."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    method = _method(cfg)
    model, tokenizer = load_model(cfg)
    device = next(model.parameters()).device
    train_rows = load_records(cfg.train, "train", ("query", "response"))
    test_rows = load_records(cfg.test, "test", ("question", "answer"))
    if cfg.val is not None:
        val_rows = load_records(cfg.val, "train", ("question", "answer"))[: cfg.n_val]
    elif _is_local(cfg.test):
        val_rows, test_rows = test_rows[: cfg.n_val], test_rows[cfg.n_val :]
    else:
        val_rows = load_records(cfg.test, "train", ("question", "answer"))[: cfg.n_val]
    test_rows = test_rows[: cfg.n_test] if cfg.n_test else test_rows
    if not train_rows or not test_rows:
        raise HarnessError(f"no records to train on ({cfg.train}) or to test on ({cfg.test})")
    train = [_train_example(row, tokenizer, cfg.max_length) for row in train_rows]
    val = [_test_example(row, tokenizer) for row in val_rows]
    test = [_test_example(row, tokenizer) for row in test_rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    calibration = [
        {k: v.to(device) for k, v in core.train_batch(train[i : i + cfg.batch], pad_id).items() if k != "labels"}
        for i in range(0, min(len(train), 8 * cfg.batch), cfg.batch)
    ]
    model = method.build(model, calibration)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else seed_lr(method.title)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def score(examples: list[core.Example]) -> tuple[float, float]:
        acc, _, seconds = core.evaluate(
            model,
            examples,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            pad_id,
            tokenizer.eos_token_id,
            cfg.max_new_tokens,
            cfg.eval_batch,
        )
        return acc, seconds

    validation, losses = [], []
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    bar = tqdm(range(cfg.steps), desc=f"{method.title} on {Path(cfg.train).name}", unit="step", file=sys.stderr)
    for step in bar:
        idx = [order[(step * cfg.batch + i) % len(order)] for i in range(cfg.batch)]
        losses.append(core.train_step(model, optimizer, core.train_batch([train[i] for i in idx], pad_id), clip=1.0))
        schedule.step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if val and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            acc, _ = score(val)
            validation.append({"step": step + 1, "accuracy": acc})
            bar.write(f"step {step + 1}: validation accuracy {acc:.1%} ({len(val)} records)")
    train_seconds = time.perf_counter() - start
    accuracy, eval_seconds = score(test)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    from lora_lite.bench.report import git_commit

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git_commit": git_commit(),
        "model": cfg.model,
        "variant": method.title,
        "quant": cfg.quant or "none",
        "steps": cfg.steps,
        "batch": cfg.batch,
        "lr": lr,
        "hypers": method.cfg.to_dict() if method.cfg is not None else {},
        "trainable_params": sum(p.numel() for p in params),
        "test_accuracy": accuracy,
        "n_test": len(test),
        "best_val_accuracy": max((v["accuracy"] for v in validation), default=None),
        "peak_cuda_gb": peak,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "device": str(device),
        "validation": validation,
        "losses": losses,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    append_results(record, cfg.results)
    print(
        f"{method.title}: GSM8K accuracy {accuracy:.1%} on {len(test)} problems; "
        f"{record['trainable_params']:,} trainable params; train {train_seconds:.0f} s, eval {eval_seconds:.0f} s"
        + (f", peak CUDA memory {peak:.1f} GB" if peak is not None else ", on CPU (no CUDA memory to report)")
    )
    print(f"appended to {cfg.results} and {cfg.results.with_suffix('.jsonl')}")
    return record


def _method(cfg: HarnessConfig):
    known = {m.title.lower(): m for m in ours()}
    method = known.get(cfg.variant.lower())
    if method is None:
        raise HarnessError(f"unknown variant {cfg.variant!r}; known: {', '.join(m.title for m in ours())}")
    if family(method.title) != "gain":  # the seed's r=32, alpha=64 for the LoRA family
        changes = {k: v for k, v in (("r", cfg.r), ("alpha", cfg.alpha)) if hasattr(method.cfg, k)}
        method.cfg = replace(method.cfg, **changes)
    return method


def load_model(cfg: HarnessConfig):
    """AutoModelForCausalLM and AutoTokenizer from a hub id or a local folder, optionally quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise HarnessError(f"unknown dtype {cfg.dtype!r} (use bfloat16, float16 or float32)")
    kwargs: dict = {"dtype": dtype}
    if cfg.quant is not None:
        if cfg.quant not in ("4bit", "8bit"):
            raise HarnessError(f"--quant must be 4bit or 8bit, not {cfg.quant!r}")
        if not torch.cuda.is_available():
            raise HarnessError("4-bit/8-bit loading (bitsandbytes) needs a CUDA GPU, and none is available")
        from transformers import BitsAndBytesConfig

        if cfg.quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot load the model {cfg.model!r}: {exc}") from None
    if cfg.quant is None and torch.cuda.is_available():
        model = model.to("cuda")
    if tokenizer.eos_token_id is None:
        raise HarnessError(f"the tokenizer of {cfg.model!r} has no end-of-sequence token")
    tokenizer.padding_side = "left"
    return model, tokenizer


def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


def load_records(source: str, split: str, fields: tuple[str, str]) -> list[dict]:
    """Records with `fields` from a hub dataset id (its `split`) or a local .json/.jsonl file."""
    import datasets

    try:
        if _is_local(source):
            if not Path(source).exists():
                raise HarnessError(f"no such file: {source}")
            data = datasets.load_dataset("json", data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, "main" if source.endswith("gsm8k") else None, split=split)
    except HarnessError:
        raise
    except Exception as exc:  # datasets raises many types: connection, missing split, bad JSON
        raise HarnessError(f"cannot load {source!r} ({split}): {exc}") from None
    missing = [f for f in fields if f not in data.column_names]
    if missing:
        raise HarnessError(f"{source}: records need the fields {list(fields)}; missing {missing}")
    return [{f: row[f] for f in fields} for row in data]


def _train_example(row: dict, tokenizer, max_length: int) -> core.Example:
    prompt = tokenizer(TEMPLATE.format(query=row["query"]))["input_ids"]
    target = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max(max_length - len(prompt), 1)
    return core.Example(prompt[-max_length:], target[:room], "")


def _test_example(row: dict, tokenizer) -> core.Example:
    answer = core.extract_answer(row["answer"])
    if answer is None:
        raise HarnessError(f"a GSM8K record has no final answer (#### n): {row['answer'][-80:]!r}")
    return core.Example(tokenizer(TEMPLATE.format(query=row["question"]))["input_ids"], [], answer)


def append_results(record: dict, path: Path) -> None:
    """One row in the TSV (header written when the file is new); the full record in the .jsonl beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        if new:
            writer.writerow(TSV_COLUMNS)
        writer.writerow(["" if record[c] is None else _cell(record[c]) for c in TSV_COLUMNS])
    with path.with_suffix(".jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
