"""The accuracy rows: every method fine-tunes copies of the base on the task, over several seeds, and is scored.

For each seed, every row starts from a copy of the same pretrained base, with
its adapter drawn from that seed, and trains on the same batches in the same
order (the seed shuffles the training split); the rows take their steps
round-robin in one process (the starting row rotates every step), so machine
noise hits them alike. PEFT's rows start from our rows' initial values, every
tensor the record maps (`peft_records.copy_to_twin`; where PEFT shares a tensor
across layers, VeRA's A and B, ours take PEFT's). Test accuracy is greedy generation on the held-out
problems, the answer extracted from the text and compared exactly, as GSM8K is
scored; the test split is the same for every seed.

Each of our rows trains at its own learning rate, chosen before the seeds run
(`select_rates`): a short run at each rate of `Settings.lr_grid` on the training
split, and the rate with the lowest loss on its last batches, each seen for the
first time, wins. Methods differ in how far one AdamW step moves their output
(C3A divides its update by d_in; a gain vector moves every output), so one rate
per family cannot serve them all, as PEFT's method comparison sets a rate per
method. PEFT's row of a method and our broken control of it take our row's rate.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lora_lite.bench import core, task
from lora_lite.bench.base import example
from lora_lite.bench.methods import Method
from lora_lite.bench.settings import WARMUP_STEPS, Settings
from lora_lite.peft_records import copy_to_twin

SELECT_SEED = 1000  # the order of the training split in the rate selection: none of the seeds' orders
SELECT_SCORED = 5  # the last steps of a selection run whose mean loss scores its rate


@dataclass
class Trainee:
    """One row of one seed while it trains."""

    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    trainable: int
    init_seconds: float  # attach and init (calibration included), or PEFT's wrap and init
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int = 0


@dataclass
class Outcome:
    """What a row gave over all seeds, in the order of the seeds."""

    method: Method
    lr: float
    trainable: int
    accuracies: list[float] = field(default_factory=list)
    final_losses: list[float] = field(default_factory=list)
    init_seconds: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # every seed's steps after its first WARMUP_STEPS
    eval_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # from the first seed's first step
    samples: list[str] = field(default_factory=list)  # the first seed's first generations
    rate_scores: dict[float, float] = field(default_factory=dict)  # our rows: select_rates' score of each rate

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)


def train_batches(problems: list[task.Problem], settings: Settings, seed: int, tok: task.Tokenizer) -> list[dict]:
    """The training split shuffled by `seed`, cut into `train_steps` batches."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    examples = [example(p, tok) for p in order]
    return [
        core.train_batch(examples[i * settings.batch : (i + 1) * settings.batch], tok.pad_id)
        for i in range(settings.train_steps)
    ]


def calibration_of(batches: list[dict], n: int = 4) -> list[dict]:
    return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches[:n]]


def select_rates(
    base: nn.Module, methods: list[Method], settings: Settings, tok: task.Tokenizer, train_set: list[task.Problem]
) -> dict[str, dict[float, float]]:
    """Title -> {rate: its score} for each of our rows: each rate of `settings.lr_grid` trains a copy for
    `settings.select_steps` steps (the first seed's adapter init, the training split in another order) and scores
    the mean loss over its last `SELECT_SCORED` steps (a loss is taken before the step that learns from its batch,
    so it is a held-out loss; NaN scores inf). The lowest score's rate wins (`chosen`)."""
    mine = [m for m in methods if m.implementation == "lora-lite"]
    if not mine:
        return {}
    short = replace(settings, train_steps=settings.select_steps)
    batches = train_batches(train_set, short, SELECT_SEED, tok)
    grid = [(m, lr) for m in mine for lr in settings.lr_grid]
    rows = build(base, [m for m, _ in grid], short, settings.seeds[0], calibration_of(batches), [lr for _, lr in grid])
    train_interleaved(rows, batches, measure_peak=False, desc=f"learning rates: {len(rows)} runs")
    scores: dict[str, dict[float, float]] = {}
    for row in rows:
        loss = statistics.fmean(row.losses[-SELECT_SCORED:])
        scores.setdefault(row.method.title, {})[row.lr] = loss if math.isfinite(loss) else math.inf
    return scores


def chosen(scores: dict[float, float]) -> float:
    """The rate with the lowest score (the smaller rate on a tie)."""
    return min(scores, key=lambda lr: (scores[lr], lr))


def build(
    base: nn.Module,
    methods: list[Method],
    settings: Settings,
    seed: int,
    calibration: list[dict],
    rates: list[float],
) -> list[Trainee]:
    """One trainee per method, each on its own copy of `base` and with its rate of `rates`; adapters drawn after
    `torch.manual_seed(seed)`."""
    rows: list[Trainee] = []
    for method, lr in zip(methods, rates, strict=True):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model = method.build(model, calibration).train()
        init_seconds = time.perf_counter() - t0
        if method.implementation == "peft":
            ours = next(r for r in rows if r.method.key == f"{method.title} (lora-lite)")
            copy_to_twin(ours.model, model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rows.append(Trainee(method, model, optimizer, lr, sum(p.numel() for p in params), init_seconds))
    return rows


def train_interleaved(rows: list[Trainee], batches: list[dict], measure_peak: bool, desc: str) -> None:
    """Every row takes step i on batch i before any row takes step i + 1; the first row rotates."""
    from tqdm import tqdm

    for step in tqdm(range(len(batches)), desc=desc, unit="step", file=sys.stderr):
        shift = step % len(rows)
        for row in rows[shift:] + rows[:shift]:
            batch = batches[step]
            if step == 0 and measure_peak:  # the first step (it creates the optimizer state) measures the peak
                loss, transient = core.profiled_peak(lambda r=row, b=batch: core.train_step(r.model, r.optimizer, b))
                row.peak_bytes = core.tensor_bytes(row.model) + transient
                row.step_times.append(float("nan"))
            else:
                t0 = time.perf_counter()
                loss = core.train_step(row.model, row.optimizer, batch)
                row.step_times.append(time.perf_counter() - t0)
            row.losses.append(loss)


def evaluate(
    models: list[nn.Module], test: list[core.Example], tok: task.Tokenizer, settings: Settings
) -> list[tuple[float, float, list[str]]]:
    """(accuracy, seconds, first three generations) of each model on the test split; batches interleaved."""
    correct = [0] * len(models)
    seconds = [0.0] * len(models)
    samples: list[list[str]] = [[] for _ in models]
    for i in range(0, len(test), settings.eval_batch):
        chunk = test[i : i + settings.eval_batch]
        for j, model in enumerate(models):
            acc, texts, took = core.evaluate(
                model, chunk, tok.decode, tok.pad_id, tok.eos_id, settings.max_new_tokens, settings.eval_batch
            )
            correct[j] += round(acc * len(chunk))
            seconds[j] += took
            samples[j] += texts[: 3 - len(samples[j])]
    return [(correct[j] / len(test), seconds[j], samples[j]) for j in range(len(models))]


def run_seeds(
    base: nn.Module, methods: list[Method], settings: Settings, tok: task.Tokenizer
) -> tuple[list[Outcome], tuple[float, float]]:
    """Train and score every method once per seed; (one outcome per method, (base accuracy, base eval seconds))."""
    train_set, test_set = task.splits(settings.train_steps * settings.batch, settings.n_test, settings.seed + 1)
    test = [example(p, tok) for p in test_set]
    selection = select_rates(base, methods, settings, tok, train_set)
    rates = [settings.full_lr if m.implementation == "torch" else chosen(selection[m.title]) for m in methods]
    outcomes: list[Outcome] = []
    for k, seed in enumerate(settings.seeds):
        batches = train_batches(train_set, settings, seed, tok)
        rows = build(base, methods, settings, seed, calibration_of(batches), rates)
        desc = f"seed {seed} ({k + 1}/{len(settings.seeds)}): {len(rows)} rows"
        train_interleaved(rows, batches, measure_peak=k == 0, desc=desc)
        scores = evaluate([row.model for row in rows], test, tok, settings)
        if k == 0:
            outcomes = [
                Outcome(
                    row.method,
                    row.lr,
                    row.trainable,
                    peak_bytes=row.peak_bytes,
                    rate_scores=selection.get(row.method.title, {}) if row.method.implementation == "lora-lite" else {},
                )
                for row in rows
            ]
        for out, row, (acc, seconds, samples) in zip(outcomes, rows, scores, strict=True):
            out.accuracies.append(acc)
            out.final_losses.append(row.losses[-1])
            out.init_seconds.append(row.init_seconds)
            out.step_times += row.step_times[WARMUP_STEPS:]
            out.eval_seconds.append(seconds)
            out.samples = out.samples or samples
        del rows
    base_accuracy, base_seconds, _ = evaluate([base], test, tok, settings)[0]
    return outcomes, (base_accuracy, base_seconds)
