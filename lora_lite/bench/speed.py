"""`lora-lite bench --speed`: train step time, init time and peak memory, ours over PEFT's same method, and the
hooks' forward overhead, on Qwen3-0.6B's layer shapes with random weights.

On the CPU (`CPU`): Qwen3-0.6B's layer sizes with 2 layers and a vocabulary of
1024 (the real 151,936-row embedding and head would dwarf the layers being
compared), batch 2 x 64 tokens, float32. With `--device cuda` (`SEED_GEOMETRY`):
the seed's geometry, 28 layers, the full vocabulary, bfloat16, batch 4 x 512.
Every variant whose PEFT record names a twin (`lora_lite.peft_records`) is
timed against it; the others are listed with their record's reason. Each
method's two rows are built on copies of one random model and take their
steps alternately on the same batches; the ratio is the median over the timed
steps of ours over PEFT's same step, which cancels the machine's slow drifts.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lora_lite.bench import core
from lora_lite.bench.methods import ORDER, all_rows, family, twin_refusals
from lora_lite.bench.methods import ours as our_rows
from lora_lite.bench.report import ForwardOverhead, SpeedReport, SpeedRow
from lora_lite.bench.settings import WARMUP_STEPS

# train step time over PEFT's same method; methods not named here: DEFAULT_TARGET
TARGETS = {"LoRA": 1.0, "DoRA": 0.9, "HRA": 0.8}
DEFAULT_TARGET = 1.05
FORWARD_TARGET = 1.05


@dataclass(frozen=True)
class SpeedSettings:
    hidden: int = 1024
    layers: int = 2
    vocab: int = 1024
    batch: int = 2
    tokens: int = 64
    steps: int = 24  # per row, alternating with PEFT's; the first `warmup` not timed
    warmup: int = WARMUP_STEPS
    dtype: str = "float32"
    prefill_tokens: int = 128  # forward overhead: 1 x prefill_tokens, then one-token decode steps
    repeats: int = 30
    calibration_batches: int = 2  # EVA's and CorDA's calibration data, batches of the training shape
    seed: int = 0

    def describe(self) -> str:
        sizes = f"hidden {self.hidden}, intermediate {3 * self.hidden}, {self.hidden // 64}/{self.hidden // 128} heads"
        name = "Qwen3-0.6B layer sizes" if self.hidden == 1024 else "Qwen3-0.6B layer shapes, scaled down"
        return f"{name} ({sizes} of 128), {self.layers} layers, vocab {self.vocab:,}, random weights"


CPU = SpeedSettings()
QUICK = replace(CPU, hidden=128, tokens=16, steps=WARMUP_STEPS + 2, prefill_tokens=16, repeats=3)
SEED_GEOMETRY = replace(
    CPU, layers=28, vocab=151_936, batch=4, tokens=512, steps=15, dtype="bfloat16", prefill_tokens=512, repeats=20
)


def run(settings: SpeedSettings, device: str, titles: Sequence[str] | None = None) -> SpeedReport:
    """The speed section: train steps of every variant with a PEFT twin (or those of `titles`), and the forward
    overhead."""
    start = time.perf_counter()
    base = _model(settings, device)
    rows = train_steps(base, settings, titles)
    forward = forward_overhead(base, settings)
    no_twin = twin_refusals(our_rows())
    if titles is not None:
        no_twin = {title: why for title, why in no_twin.items() if title in titles}
    wall = time.perf_counter() - start
    return SpeedReport(settings.describe(), asdict(settings), rows, forward, wall, device, no_twin)


def _model(settings: SpeedSettings, device: str) -> nn.Module:
    from lora_lite.tiny import qwen3, qwen3_0_6b_config

    config = qwen3_0_6b_config(settings.hidden, settings.layers, settings.vocab)
    return qwen3(config, seed=settings.seed).to(device=device, dtype=getattr(torch, settings.dtype))


def _cache_arg(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill_cache(model: nn.Module, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True)
    return out["cache"] if "cache" in out else out["past_key_values"]


def _decode(model: nn.Module, step: torch.Tensor, cache) -> object:
    return model(input_ids=step, use_cache=True, **{_cache_arg(model): cache})


def _sync(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model: nn.Module, fn):
    _sync(model)
    t0 = time.perf_counter()
    result = fn()
    _sync(model)
    return result, time.perf_counter() - t0


def train_steps(base: nn.Module, settings: SpeedSettings, titles: Sequence[str] | None = None) -> list[SpeedRow]:
    """Per variant with a PEFT twin (those titled in `titles`, if given): ours and PEFT's, built on copies of `base`
    (timed: attach and init), then alternate train steps on the same batches; the first step measures the peak
    memory and is not timed."""
    from tqdm import tqdm

    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(settings.seed)
    batches = []
    for _ in range(settings.steps):
        ids = torch.randint(0, vocab, (settings.batch, settings.tokens), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    device = next(base.parameters()).device  # calibration runs the model's own forward: its batches go there
    calibration = [
        {k: b[k].to(device) for k in ("input_ids", "attention_mask")} for b in batches[: settings.calibration_batches]
    ]
    base.train()
    core.loss_of(base, batches[0]).backward()  # one untimed step first: the first pair must not pay for warm-up
    base.zero_grad(set_to_none=True)
    base.eval()
    methods = all_rows(r_cap=None)
    pairs = [
        (next(o for o in methods if o.key == f"{m.title} (lora-lite)"), m)
        for m in methods
        if m.implementation == "peft" and (titles is None or m.title in titles)
    ]
    from lora_lite.tiny import qwen3, qwen3_config

    for method in pairs[0]:  # untimed: the first build of each implementation pays for imports and set-up
        method.build(qwen3(qwen3_config()), None)
    results = []
    for ours, theirs in tqdm(pairs, desc=f"train steps, {settings.describe()}", unit="method", file=sys.stderr):
        if family(ours.title) != "gain" and ours.title in ORDER:  # the seed's r=32, alpha=64; the others: defaults
            hypers = {k: v for k, v in (("r", 32), ("alpha", 64.0)) if hasattr(ours.cfg, k)}
            ours, theirs = (
                replace(ours, cfg=replace(ours.cfg, **hypers)),
                replace(theirs, cfg=replace(ours.cfg, **hypers)),
            )
        rows = []
        for method in (ours, theirs):
            torch.manual_seed(settings.seed)
            model, init = _timed(base, lambda m=method: m.build(copy.deepcopy(base), calibration).train())
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            _, transient = core.profiled_peak(lambda m=model, o=optimizer: core.train_step(m, o, batches[0]))
            rows.append((model, optimizer, [], init, core.tensor_bytes(model) + transient))
        for step, batch in enumerate(batches[1:]):
            for model, optimizer, times, _, _ in rows if step % 2 == 0 else rows[::-1]:
                step_fn = lambda m=model, o=optimizer, b=batch: core.train_step(m, o, b)  # noqa: E731
                times.append(_timed(model, step_fn)[1])
        (_, _, ours_t, ours_init, ours_peak), (_, _, theirs_t, theirs_init, theirs_peak) = rows
        ours_t, theirs_t = ours_t[settings.warmup - 1 :], theirs_t[settings.warmup - 1 :]
        # the two rows' step i ran back to back: the median of their ratios cancels the machine's slow drifts
        ratio = statistics.median(a / b for a, b in zip(ours_t, theirs_t, strict=True))
        target = TARGETS.get(ours.title, DEFAULT_TARGET)
        results.append(
            SpeedRow(
                ours.title,
                statistics.median(ours_t),
                statistics.median(theirs_t),
                ratio,
                target,
                ours_init,
                theirs_init,
                ours_peak,
                theirs_peak,
            )
        )
        del rows
    return results


def forward_overhead(bare: nn.Module, settings: SpeedSettings) -> ForwardOverhead:
    """LoRA r=8 on q_proj/v_proj over the bare model, no grad: a prefill of 1 x prefill_tokens, and one new token
    decoded with the KV cache of that prefill; run alternately, as the median of paired ratios."""
    import lora_lite as ll

    bare.eval()
    adapted = copy.deepcopy(bare)
    ll.attach(adapted, ll.LoRAConfig(r=8, alpha=16))
    device = next(bare.parameters()).device
    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, bare.config.vocab_size, (1, settings.prefill_tokens), generator=gen).to(device)
    step = ids[:, -1:]
    prefill: dict[str, list[float]] = {"bare": [], "lora": []}
    decode: dict[str, list[float]] = {"bare": [], "lora": []}
    with torch.no_grad():
        caches = {name: _prefill_cache(model, ids) for name, model in (("bare", bare), ("lora", adapted))}
        for i in range(settings.repeats + 1):  # the first round warms up
            pair = (("bare", bare), ("lora", adapted))
            for name, model in pair if i % 2 == 0 else pair[::-1]:
                took = _timed(model, lambda m=model: m(input_ids=ids, use_cache=False))[1]
                prefill[name].append(took)
                decode[name].append(_timed(model, lambda m=model, c=caches[name]: _decode(m, step, c))[1])
                caches[name].crop(-1)  # back to the prefill's cache for the next round
    prefill = {k: v[1:] for k, v in prefill.items()}
    decode = {k: v[1:] for k, v in decode.items()}

    def ratio(times: dict[str, list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(times["lora"], times["bare"], strict=True))

    return ForwardOverhead(
        settings.prefill_tokens,
        statistics.median(prefill["bare"]),
        statistics.median(prefill["lora"]),
        ratio(prefill),
        statistics.median(decode["bare"]),
        statistics.median(decode["lora"]),
        ratio(decode),
        FORWARD_TARGET,
    )
