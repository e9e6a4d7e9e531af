"""`lora-lite bench`: every variant, PEFT's same methods and a full fine-tune on an embedded task.

The base is a small Qwen3 (transformers' Qwen3Config, random init) pretrained in
process on the synthetic corpus of `lora_lite.bench.task`, cached on disk keyed
by its settings (`$LORA_LITE_CACHE`, else ~/.cache/lora-lite), so a second run
skips pretraining. Every row then fine-tunes a copy of it on the same batches,
in the same order, from the same seed; the rows take their steps round-robin
in one process (the starting row rotates every step), so machine noise hits
them alike. Test accuracy is greedy generation on held-out problems, the
answer extracted from the text and compared exactly, as GSM8K is scored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lora_lite.bench import core, task
from lora_lite.bench.methods import Method, all_rows, copy_init, family

CORPUS_VERSION = 1  # bump when task.py's corpus changes: it is part of the cache key
WARMUP_STEPS = 3  # steps left out of the median step time
PASS_FRACTION = 0.5  # a variant passes at >= half of full fine-tuning's accuracy
# train step time over PEFT's same method; methods not named here: DEFAULT_TARGET
TARGETS = {"LoRA": 1.0, "DoRA": 0.9, "HRA": 0.8}
DEFAULT_TARGET = 1.05
FORWARD_TARGET = 1.05


@dataclass(frozen=True)
class Settings:
    hidden: int = 128
    layers: int = 3
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 1200
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-3
    train_steps: int = 250
    batch: int = 16
    n_test: int = 200
    eval_batch: int = 100
    max_new_tokens: int = 16
    lr: dict = field(default_factory=lambda: {"lora": 3e-3, "delora": 1e-2, "gain": 2e-2, "full": 1e-3})
    forward_tokens: int = 128  # tokens in the forward-overhead measurement
    forward_repeats: int = 30
    scale_hidden: int = 1024  # Qwen3-0.6B's; --quick uses a smaller model of the same shape
    scale_batch: int = 2  # train steps on Qwen3-0.6B layer sizes: batch x scale_tokens tokens
    scale_tokens: int = 64
    profile_steps: int = 10  # `--profile`: profiled train steps per row
    scale_steps: int = 24  # per row, interleaved with PEFT's same method; the first WARMUP_STEPS not timed
    seed: int = 0

    def pretrain_key(self) -> str:
        """The cache key: everything the pretrained base depends on."""
        keys = ("hidden", "layers", "intermediate", "heads", "kv_heads", "pretrain_steps", "pretrain_batch")
        spec = {k: getattr(self, k) for k in (*keys, "pretrain_lr", "seed")}
        spec |= {"vocab": task.Tokenizer().vocab, "corpus": CORPUS_VERSION, "max_number": task.MAX_NUMBER}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT = Settings()
QUICK = replace(
    DEFAULT,
    hidden=64,
    layers=2,
    intermediate=128,
    pretrain_steps=250,
    pretrain_batch=32,
    pretrain_lr=3e-3,
    train_steps=25,
    batch=8,
    n_test=48,
    eval_batch=48,
    forward_tokens=16,
    forward_repeats=3,
    scale_hidden=128,
    profile_steps=3,
    scale_tokens=16,
    scale_steps=WARMUP_STEPS + 2,
)


@dataclass
class Row:
    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    trainable: int
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    accuracy: float = 0.0
    eval_seconds: float = 0.0
    samples: list[str] = field(default_factory=list)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times[WARMUP_STEPS:] or self.step_times)


def run(
    quick: bool = False, out: Path = Path("bench-results"), cache: Path | None = None, profile: bool = False
) -> int:
    """Run the benchmark, print the table, write JSON and a plot into `out`; 0 unless it is broken."""
    try:
        import transformers  # noqa: F401
        from tqdm import tqdm  # noqa: F401
    except ImportError:
        print('lora-lite bench needs transformers, peft, tqdm and matplotlib: pip install "lora-lite[bench]"')
        return 1
    torch.set_num_threads(1)  # one thread: steady timings on a shared machine, no oversubscription
    settings = QUICK if quick else DEFAULT
    start = time.perf_counter()
    tok = task.Tokenizer()
    base = pretrained_base(settings, tok, cache or cache_dir())
    if profile:
        return profile_steps(base, settings, tok)
    train_set, test_set = task.splits(settings.train_steps * settings.batch, settings.n_test, settings.seed + 1)
    train = [_example(p, tok) for p in train_set]
    test = [_example(p, tok) for p in test_set]
    batches = [
        core.train_batch(train[i * settings.batch : (i + 1) * settings.batch], tok.pad_id)
        for i in range(settings.train_steps)
    ]
    calibration = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches[:4]]
    rows = build_rows(base, settings, calibration)
    train_interleaved(rows, batches, settings)
    base_accuracy, base_eval = evaluate_rows(rows, base, test, tok, settings)
    forward = forward_overhead(settings, base, batches[0]["input_ids"])
    scale = speed_at_scale(settings)
    wall = time.perf_counter() - start
    report = make_report(rows, settings, base_accuracy, base_eval, forward, scale, wall, base)
    print(report["markdown"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_results.json").write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2))
    plot(report, out / "bench_plot.png")
    print(f"\nwrote {out / 'bench_results.json'} and {out / 'bench_plot.png'} ({wall:.0f} s in all)")
    full = report["full_finetune_accuracy"]
    if full <= base_accuracy:
        print(f"BROKEN: full fine-tuning ({full:.1%}) does not beat the base ({base_accuracy:.1%})")
        return 1
    return 0


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_LITE_CACHE") or Path.home() / ".cache" / "lora-lite")


def _example(problem: task.Problem, tok: task.Tokenizer) -> core.Example:
    return core.Example(
        [tok.bos_id, *tok.encode(problem.question)], [*tok.encode(problem.answer), tok.eos_id], str(problem.result)
    )


def model_config(settings: Settings, tok: task.Tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tok),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        head_dim=settings.hidden // settings.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )


def pretrained_base(settings: Settings, tok: task.Tokenizer, cache: Path) -> nn.Module:
    """The pretrained base: from the cache when its key is there, else pretrained now and cached."""
    from tqdm import tqdm
    from transformers import Qwen3ForCausalLM

    folder = cache / f"bench-base-{settings.pretrain_key()}"
    if (folder / "config.json").exists():
        print(f"pretrained base: {folder} (cached)")
        return Qwen3ForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(settings.seed)
    model = Qwen3ForCausalLM(model_config(settings, tok))
    lines = task.pretraining_corpus(settings.pretrain_steps * settings.pretrain_batch, settings.seed)
    examples = [core.Example([tok.bos_id], [*tok.encode(line), tok.eos_id], "") for line in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.pretrain_lr, total_steps=settings.pretrain_steps, pct_start=0.1
    )
    model.train()
    bar = tqdm(range(settings.pretrain_steps), desc="pretraining the base", unit="step", file=sys.stderr)
    for step in bar:
        chunk = examples[step * settings.pretrain_batch : (step + 1) * settings.pretrain_batch]
        loss = core.train_step(model, optimizer, core.train_batch(chunk, tok.pad_id))
        schedule.step()
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.replace(folder) if not folder.exists() else None
    print(f"pretrained base: saved to {folder}")
    return Qwen3ForCausalLM.from_pretrained(folder).eval()


def build_rows(
    base: nn.Module, settings: Settings, calibration: list[dict], titles: tuple[str, ...] | None = None
) -> list[Row]:
    """One row per method (those in `titles`, if given); PEFT's rows start from our rows' random initial values."""
    rows: list[Row] = []
    for method in all_rows(r_cap=settings.hidden // 4):
        if titles is not None and method.title not in titles:
            continue
        torch.manual_seed(settings.seed)
        model = method.build(copy.deepcopy(base), calibration).train()
        if method.implementation == "peft":
            ours = next(r for r in rows if r.method.key == f"{method.title} (lora-lite)")
            copy_init(ours.model, model, method.title)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = settings.lr[method.family]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rows.append(Row(method, model, optimizer, lr, sum(p.numel() for p in params)))
    return rows


def train_interleaved(rows: list[Row], batches: list[dict], settings: Settings) -> None:
    """Every row takes step i on batch i before any row takes step i + 1; the first row rotates."""
    from tqdm import tqdm

    bar = tqdm(range(settings.train_steps), desc=f"fine-tuning {len(rows)} rows", unit="step", file=sys.stderr)
    for step in bar:
        shift = step % len(rows)
        for row in rows[shift:] + rows[:shift]:
            batch = batches[step]
            if step == 0:  # the first step (it creates the optimizer state) measures the peak memory
                loss, transient = core.profiled_peak(lambda r=row, b=batch: core.train_step(r.model, r.optimizer, b))
                row.peak_bytes = core.tensor_bytes(row.model) + transient
                row.step_times.append(float("nan"))
            else:
                t0 = time.perf_counter()
                loss = core.train_step(row.model, row.optimizer, batch)
                row.step_times.append(time.perf_counter() - t0)
            row.losses.append(loss)
    for row in rows:
        row.step_times = row.step_times[1:]


def evaluate_rows(
    rows: list[Row], base: nn.Module, test: list[core.Example], tok: task.Tokenizer, settings: Settings
) -> tuple[float, float]:
    """Accuracy of every row and of the base on the test split; eval batches interleaved across rows."""
    from tqdm import tqdm

    models = [row.model for row in rows] + [base]
    correct = [0] * len(models)
    seconds = [0.0] * len(models)
    samples: list[list[str]] = [[] for _ in models]
    chunks = [test[i : i + settings.eval_batch] for i in range(0, len(test), settings.eval_batch)]
    bar = tqdm(total=len(chunks) * len(models), desc="evaluating (greedy)", unit="batch", file=sys.stderr)
    for chunk in chunks:
        for i, model in enumerate(models):
            acc, texts, took = core.evaluate(
                model, chunk, tok.decode, tok.pad_id, tok.eos_id, settings.max_new_tokens, settings.eval_batch
            )
            correct[i] += round(acc * len(chunk))
            seconds[i] += took
            samples[i] += texts[: 3 - len(samples[i])]
            bar.update()
    bar.close()
    for i, row in enumerate(rows):
        row.accuracy, row.eval_seconds, row.samples = correct[i] / len(test), seconds[i], samples[i]
    return correct[-1] / len(test), seconds[-1]


def scale_config(hidden: int = 1024):
    """Qwen3-0.6B's layer shapes at hidden 1024 (intermediate 3 x hidden, query heads of 128 at twice the hidden
    size, half as many key/value heads), 2 layers, a vocabulary of 1024 (the real 151,936-row embedding and head
    would dwarf the layers being compared)."""
    from transformers import Qwen3Config

    heads = hidden // 64
    return Qwen3Config(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=128,
        tie_word_embeddings=True,
    )


def scale_model(hidden: int) -> str:
    c = scale_config(hidden)
    heads = f"{c.num_attention_heads}/{c.num_key_value_heads} heads of 128"
    sizes = f"hidden {hidden}, intermediate {c.intermediate_size}, {heads}"
    name = "Qwen3-0.6B layer sizes" if hidden == 1024 else "Qwen3-0.6B layer shapes, scaled down"
    return f"{name} ({sizes}), 2 layers, vocab 1024, random weights"


def forward_overhead(settings: Settings, small: nn.Module, small_ids: torch.Tensor) -> dict:
    """Forward time (no grad) with LoRA r=8 on q_proj/v_proj over the bare model: on Qwen3-0.6B layer sizes (the
    target), and on the benchmark's own small model (`small`, on `small_ids`), where the hooks' fixed cost shows."""
    from transformers import Qwen3ForCausalLM

    config = scale_config(settings.scale_hidden)
    torch.manual_seed(settings.seed)
    ids = torch.randint(0, config.vocab_size, (1, settings.forward_tokens), generator=torch.Generator().manual_seed(0))
    bare_s, lora_s, ratio = _forward_times(Qwen3ForCausalLM(config).eval(), ids, settings.forward_repeats)
    small_bare, small_lora, small_ratio = _forward_times(small, small_ids, 3 * settings.forward_repeats)
    return {
        "model": f"{scale_model(settings.scale_hidden)}; batch 1 x {settings.forward_tokens} tokens, no grad",
        "bare_seconds": bare_s,
        "lora_seconds": lora_s,
        "ratio": ratio,
        "target": FORWARD_TARGET,
        "small_model": f"the benchmark's base; batch {small_ids.shape[0]} x {small_ids.shape[1]} tokens, no grad",
        "small_bare_seconds": small_bare,
        "small_lora_seconds": small_lora,
        "small_ratio": small_ratio,
    }


def _forward_times(bare: nn.Module, ids: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median forward seconds of `bare` and of a copy with LoRA r=8 on q_proj/v_proj, run alternately, and the
    median of the ratios of each adapted forward over the bare one next to it."""
    import lora_lite as ll

    adapted = copy.deepcopy(bare)
    ll.attach(adapted, ll.LoRAConfig(r=8, alpha=16))
    times: dict[str, list[float]] = {"bare": [], "lora": []}
    with torch.no_grad():
        for model in (bare, adapted):  # warm-up
            model(input_ids=ids)
        for i in range(repeats):
            pair = (("bare", bare), ("lora", adapted))
            for name, model in pair if i % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times["lora"], times["bare"], strict=True))
    return statistics.median(times["bare"]), statistics.median(times["lora"]), ratio


def speed_at_scale(settings: Settings) -> list[dict]:
    """Train step time, ours over PEFT's same method, on Qwen3-0.6B layer sizes with the seed's hypers (r=32).

    Each method's two rows are built on copies of one random model and take
    their steps alternately on the same batches; the ratio is the median over
    the timed steps of ours over PEFT's same step.
    """
    from tqdm import tqdm
    from transformers import Qwen3ForCausalLM

    config = scale_config(settings.scale_hidden)
    torch.manual_seed(settings.seed)
    base = Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(settings.seed)
    shape = (settings.scale_batch, settings.scale_tokens)
    batches = []
    for _ in range(settings.scale_steps):
        ids = torch.randint(0, config.vocab_size, shape, generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    calibration = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches[:2]]
    core.loss_of(base, batches[0]).backward()  # one untimed step first: the first pair must not pay for warm-up
    base.zero_grad(set_to_none=True)
    methods = all_rows(r_cap=None)
    pairs = [
        (m, next(o for o in methods if o.key == f"{m.title} (lora-lite)"))
        for m in methods
        if m.implementation == "peft"
    ]
    results = []
    for theirs, ours in tqdm(
        pairs, desc=f"train steps at hidden {settings.scale_hidden}", unit="method", file=sys.stderr
    ):
        if family(ours.title) != "gain":  # the seed's r=32, alpha=64
            ours.cfg = theirs.cfg = replace(
                ours.cfg, **{k: v for k, v in (("r", 32), ("alpha", 64.0)) if hasattr(ours.cfg, k)}
            )
        rows = []
        for method in (ours, theirs):
            torch.manual_seed(settings.seed)
            model = method.build(copy.deepcopy(base), calibration).train()
            params = [p for p in model.parameters() if p.requires_grad]
            rows.append((model, torch.optim.AdamW(params, lr=1e-4), []))
        for step, batch in enumerate(batches):
            for model, optimizer, times in rows if step % 2 == 0 else rows[::-1]:
                t0 = time.perf_counter()
                core.train_step(model, optimizer, batch)
                times.append(time.perf_counter() - t0)
        ours_t, theirs_t = (times[WARMUP_STEPS:] for _, _, times in rows)
        # the two rows' step i ran back to back: the median of their ratios cancels the machine's slow drifts
        ratio = statistics.median(a / b for a, b in zip(ours_t, theirs_t, strict=True))
        target = TARGETS.get(ours.title, DEFAULT_TARGET)
        results.append(
            {
                "variant": ours.title,
                "ours_seconds": statistics.median(ours_t),
                "peft_seconds": statistics.median(theirs_t),
                "ratio": ratio,
                "target": target,
                "met": ratio <= target,
            }
        )
        del rows
    return results


def make_report(
    rows: list[Row],
    settings: Settings,
    base_accuracy: float,
    base_eval: float,
    forward: dict,
    scale: list[dict],
    wall: float,
    base: nn.Module,
) -> dict:
    full = next(r for r in rows if r.method.implementation == "torch")
    peft_step = {r.method.title: r.median_step for r in rows if r.method.implementation == "peft"}
    peft_acc = {r.method.title: r.accuracy for r in rows if r.method.implementation == "peft"}
    results = []
    for r in rows:
        ratio = None
        if r.method.title in peft_step:
            ratio = r.median_step / peft_step[r.method.title]
        results.append(
            {
                "variant": r.method.title,
                "implementation": r.method.implementation,
                "quantizable": r.method.quantizable,
                "accuracy": r.accuracy,
                "trainable_params": r.trainable,
                "peak_memory_bytes": r.peak_bytes,
                "median_step_seconds": r.median_step,
                "step_ratio_vs_peft": ratio,
                "eval_seconds": r.eval_seconds,
                "lr": r.lr,
                "final_loss": r.losses[-1],
                "passes": r.accuracy >= PASS_FRACTION * full.accuracy if r.method.implementation != "torch" else None,
                "samples": r.samples,
            }
        )
    lora_gap = None
    ours_lora = next((r for r in rows if r.method.key == "LoRA (lora-lite)"), None)
    if ours_lora is not None and "LoRA" in peft_acc:
        lora_gap = abs(ours_lora.accuracy - peft_acc["LoRA"]) * 100
    report = {
        "settings": asdict(settings),
        "base_params": sum(p.numel() for p in base.parameters()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": wall,
        "base_accuracy": base_accuracy,
        "base_eval_seconds": base_eval,
        "full_finetune_accuracy": full.accuracy,
        "pass_mark": PASS_FRACTION * full.accuracy,
        "rows": results,
        "speed_vs_peft": scale,
        "speed_model": f"{scale_model(settings.scale_hidden)}; batch {settings.scale_batch} x "
        f"{settings.scale_tokens} tokens, r=32 (alpha 64) for the LoRA family, "
        f"{settings.scale_steps - WARMUP_STEPS} timed steps per row",
        "forward_overhead": forward,
        "lora_accuracy_gap_points": lora_gap,
    }
    report["markdown"] = markdown(report)
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"lora-lite bench: Qwen3 ({report['base_params']:,} params: hidden {s['hidden']}, {s['layers']} layers), "
        f"pretrained in process; {s['train_steps']} AdamW steps of batch {s['batch']} per row, "
        f"{s['n_test']} held-out problems, greedy, exact match of the `####` answer",
        "",
        "| variant | implementation | 4bit/8bit | test accuracy | trainable params | peak memory | "
        "step time (median) | vs PEFT | eval time | pass |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        quant = "-" if r["quantizable"] is None else ("yes" if r["quantizable"] else "no")
        ratio = "-" if r["step_ratio_vs_peft"] is None else f"{r['step_ratio_vs_peft']:.2f}x"
        passed = "-" if r["passes"] is None else ("yes" if r["passes"] else "NO")
        lines.append(
            f"| {r['variant']} | {r['implementation']} | {quant} | {r['accuracy']:.1%} | {r['trainable_params']:,} | "
            f"{r['peak_memory_bytes'] / 2**20:.1f} MiB | {r['median_step_seconds'] * 1000:.1f} ms | {ratio} | "
            f"{r['eval_seconds']:.2f} s | {passed} |"
        )
    lines.append(
        f"| base (no fine-tuning) | - | - | {report['base_accuracy']:.1%} | 0 | - | - | - | "
        f"{report['base_eval_seconds']:.2f} s | - |"
    )
    ours = [r for r in report["rows"] if r["implementation"] == "lora-lite"]
    passed = [r["variant"] for r in ours if r["passes"]]
    failed = [r["variant"] for r in ours if not r["passes"]]
    lines += [
        "",
        f"Pass mark: half of full fine-tuning's accuracy, {report['pass_mark']:.1%}. "
        f"lora-lite variants passing: {len(passed)}/{len(ours)}" + (f" (not: {', '.join(failed)})" if failed else ""),
        "",
        f"Train step time over PEFT's same method (target) on {report['speed_model']}:",
    ]
    for sp in report["speed_vs_peft"]:
        verdict = "ok" if sp["met"] else "MISSED"
        lines.append(
            f"- {sp['variant']}: {sp['ratio']:.2f}x (<= {sp['target']:.2f}x) {verdict}; "
            f"{sp['ours_seconds'] * 1000:.0f} ms vs {sp['peft_seconds'] * 1000:.0f} ms"
        )
    fw = report["forward_overhead"]
    lines += [
        "",
        f"Forward with LoRA r=8 on q_proj/v_proj over the bare model: {fw['ratio']:.3f}x (<= {fw['target']:.2f}x) "
        f"{'ok' if fw['ratio'] <= fw['target'] else 'MISSED'}; {fw['model']}",
        f"The same on {fw['small_model']} (the hooks' fixed cost): {fw['small_ratio']:.3f}x, "
        f"{fw['small_lora_seconds'] * 1000:.2f} ms vs {fw['small_bare_seconds'] * 1000:.2f} ms",
    ]
    if report["lora_accuracy_gap_points"] is not None:
        lines.append(f"LoRA accuracy, lora-lite vs PEFT: {report['lora_accuracy_gap_points']:.1f} points apart")
    lines.append(f"{report['date']}, {report['machine']}, {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"lora-lite": ("o", "tab:blue"), "peft": ("x", "tab:orange"), "torch": ("s", "tab:green")}
    for impl, (marker, color) in styles.items():
        pts = [r for r in report["rows"] if r["implementation"] == impl]
        ax.scatter([r["trainable_params"] for r in pts], [r["accuracy"] * 100 for r in pts], marker=marker, c=color)
        ax.scatter([], [], marker=marker, c=color, label=impl)
        for r in pts:
            if impl != "peft":
                ax.annotate(
                    r["variant"],
                    (r["trainable_params"], r["accuracy"] * 100),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(report["pass_mark"] * 100, ls="--", c="gray", label="pass mark (half of full fine-tune)")
    ax.axhline(report["base_accuracy"] * 100, ls=":", c="black", label="base, before fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("lora-lite bench: accuracy vs trainable parameters")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_steps(base: nn.Module, settings: Settings, tok: task.Tokenizer) -> int:
    """Where a train step's time goes: torch.profiler over `profile_steps` steps of LoRA, DoRA, HRA (ours, PEFT)."""
    from torch.profiler import ProfilerActivity, profile

    steps = settings.profile_steps
    train_set, _ = task.splits(settings.batch * (steps + WARMUP_STEPS), 0, settings.seed + 1)
    examples = [_example(p, tok) for p in train_set]
    batches = [
        core.train_batch(examples[i * settings.batch : (i + 1) * settings.batch], tok.pad_id)
        for i in range(steps + WARMUP_STEPS)
    ]
    calibration = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches[:2]]
    for row in build_rows(base, settings, calibration, titles=("LoRA", "DoRA", "HRA")):
        for batch in batches[:WARMUP_STEPS]:
            core.train_step(row.model, row.optimizer, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[WARMUP_STEPS:]:
                core.train_step(row.model, row.optimizer, batch)
        print(f"\n### {row.method.key}: {steps} train steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()
