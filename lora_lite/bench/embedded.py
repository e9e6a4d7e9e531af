"""`lora-lite bench`: every variant, PEFT's same methods, broken controls and a full fine-tune on an embedded task.

The pieces, one module each: `settings` (what a run does), `base` (the
pretrained base model and its cache), `task` (the world: tokenizer, corpus,
problems), `methods` (the rows), `accuracy` (training and scoring the rows over
seeds), `speed` (`--speed`: step time, init time, memory and forward overhead
against PEFT on Qwen3-0.6B's shapes) and `report` (the typed results, their
table, JSON and plot). This module runs them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from lora_lite.bench import accuracy, core, speed, task
from lora_lite.bench.base import cache_dir, pretrained_base
from lora_lite.bench.methods import all_rows, ours, twin_refusals
from lora_lite.bench.report import AccuracyReport, RowResult
from lora_lite.bench.settings import DEFAULT, PASS_FRACTION, QUICK, WARMUP_STEPS, Settings


def run(
    quick: bool = False,
    out: Path = Path("bench-results"),
    cache: Path | None = None,
    profile: bool = False,
    speed_only: bool = False,
    device: str = "cpu",
    methods: list[str] | None = None,
) -> int:
    """Run the benchmark, print the table, write JSON (and a plot) into `out`. `methods` (titles) keeps only
    those variants' rows and their PEFT twins (the controls and full fine-tuning always run: the pass mark).

    Returns 1 when the benchmark cannot tell (full fine-tuning does not beat the
    base, or a control passes) or `device` is missing, else 0, whichever variants pass.
    """
    try:
        import transformers  # noqa: F401
        from tqdm import tqdm  # noqa: F401
    except ImportError:
        print('lora-lite bench needs transformers, peft, tqdm and matplotlib: pip install "lora-lite[bench]"')
        return 1
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"lora-lite bench: --device {device} asked, but torch {torch.__version__} sees no CUDA device")
        return 1
    if device != "cpu" and not speed_only:
        print(
            "lora-lite bench: --device applies to the speed section; run it as `lora-lite bench --speed --device ...`"
        )
        return 1
    known = {m.title for m in ours()}
    unknown = sorted(set(methods or ()) - known)
    if unknown:
        print(f"lora-lite bench: no variant titled {', '.join(unknown)}; the titles: {', '.join(sorted(known))}")
        return 1
    torch.set_num_threads(1)  # one thread: steady timings on a shared machine, no oversubscription
    if speed_only:
        settings = speed.QUICK if quick else (speed.SEED_GEOMETRY if device != "cpu" else speed.CPU)
        report = speed.run(settings, device, methods)
        print(report.markdown())
        print(f"\nwrote {report.write(out)}")
        return 0
    settings = QUICK if quick else DEFAULT
    start = time.perf_counter()
    tok = task.Tokenizer()
    base = pretrained_base(settings, tok, cache or cache_dir())
    if profile:
        return profile_steps(base, settings, tok)
    rows = all_rows(settings.hidden // 4, True)
    if methods:
        rows = [m for m in rows if m.title in methods or m.implementation in ("torch", "control")]
    outcomes, (base_accuracy, base_eval) = accuracy.run_seeds(base, rows, settings, tok)
    report = AccuracyReport(
        title(settings, base),
        _settings_dict(settings),
        list(settings.seeds),
        sum(p.numel() for p in base.parameters()),
        base_accuracy,
        base_eval,
        results(outcomes),
        time.perf_counter() - start,
        PASS_FRACTION,
        twin_refusals(ours()),
    )
    print(report.markdown())
    path = report.write(out)
    report.plot(out / "bench_plot.png")
    print(f"\nwrote {path} and {out / 'bench_plot.png'}")
    if report.broken:
        print(f"The benchmark cannot tell: {report.broken}")
        return 1
    return 0


def title(settings: Settings, base: nn.Module) -> str:
    params = sum(p.numel() for p in base.parameters())
    return (
        f"lora-lite bench: Qwen3 ({params:,} params: hidden {settings.hidden}, {settings.layers} layers), pretrained "
        f"in process; per row and seed {settings.train_steps} AdamW steps of batch {settings.batch}; seeds "
        f"{', '.join(map(str, settings.seeds))}; {settings.n_test} held-out problems, greedy, exact match of the "
        "`####` answer"
    )


def _settings_dict(settings: Settings) -> dict:
    return asdict(settings) | {"seeds": list(settings.seeds)}


def results(outcomes: list[accuracy.Outcome]) -> list[RowResult]:
    """The typed rows; ratios against PEFT's row of the same method (median step, median init)."""
    peft = {o.method.title: o for o in outcomes if o.method.implementation == "peft"}
    rows = []
    for o in outcomes:
        twin = peft.get(o.method.title) if o.method.implementation in ("lora-lite", "peft") else None
        init = statistics.median(o.init_seconds)
        rows.append(
            RowResult(
                variant=o.method.title,
                implementation=o.method.implementation,
                quantizable=o.method.quantizable,
                accuracies=o.accuracies,
                trainable_params=o.trainable,
                peak_memory_bytes=o.peak_bytes,
                median_step_seconds=o.median_step,
                step_ratio_vs_peft=None if twin is None else o.median_step / twin.median_step,
                init_seconds=init,
                init_ratio_vs_peft=None if twin is None else init / statistics.median(twin.init_seconds),
                eval_seconds=statistics.median(o.eval_seconds),
                lr=o.lr,
                rate_scores=o.rate_scores,
                final_loss=statistics.fmean(o.final_losses),
                samples=o.samples,
            )
        )
    return rows


def profile_steps(base: nn.Module, settings: Settings, tok: task.Tokenizer) -> int:
    """Where a train step's time goes: torch.profiler over `profile_steps` steps of LoRA, DoRA, HRA (ours, PEFT)."""
    from torch.profiler import ProfilerActivity, profile

    steps = settings.profile_steps
    short = replace(settings, train_steps=steps + WARMUP_STEPS)
    train_set, _ = task.splits(short.batch * short.train_steps, 0, settings.seed + 1)
    batches = accuracy.train_batches(train_set, short, settings.seeds[0], tok)
    methods = [m for m in all_rows(settings.hidden // 4) if m.title in ("LoRA", "DoRA", "HRA")]
    rates = [settings.lr_grid[0]] * len(methods)  # a step's time does not depend on the rate
    calibration = accuracy.calibration_of(batches, 2)
    for row in accuracy.build(base, methods, settings, settings.seeds[0], calibration, rates):
        for batch in batches[:WARMUP_STEPS]:
            core.train_step(row.model, row.optimizer, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[WARMUP_STEPS:]:
                core.train_step(row.model, row.optimizer, batch)
        print(f"\n### {row.method.key}: {steps} train steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0
