"""The benchmark's reports as typed records: what a run found, its markdown, its JSON and its plot.

`AccuracyReport` is the main job's (`lora-lite bench`): one `RowResult` per
method with its accuracy on each seed, and the verdicts. `SpeedReport` is
`lora-lite bench --speed`'s: one `SpeedRow` per variant with a PEFT twin, the
reasons of those without one, and the hooks' forward overhead
(`ForwardOverhead`). Each writes its JSON with `dataclasses.asdict` plus the
derived figures (means, spreads, verdicts).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_lite.bench.methods import CONTROL_BREAKAGE


def machine() -> str:
    """Architecture, CPU count, torch build, and the kernels ATen dispatches to (`ATEN_CPU_CAPABILITY`)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {capability} kernels, 1 thread"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


@dataclass(frozen=True)
class RowResult:
    variant: str
    implementation: str  # "lora-lite", "peft", "torch" or "control"
    quantizable: bool | None  # from the spec; None for the other implementations
    accuracies: list[float]  # one per seed, in the order of AccuracyReport.seeds
    trainable_params: int
    peak_memory_bytes: int
    median_step_seconds: float
    step_ratio_vs_peft: float | None
    init_seconds: float  # median over seeds: attach and init, calibration included (PEFT: wrap and init)
    init_ratio_vs_peft: float | None
    eval_seconds: float  # median over seeds
    lr: float
    final_loss: float  # mean over seeds
    samples: list[str]
    rate_scores: dict[float, float] = field(default_factory=dict)  # our rows: the rate selection's loss per rate
    passes: bool | None = None  # set by AccuracyReport; None for full fine-tuning

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def label(self) -> str:
        return f"control: {CONTROL_BREAKAGE}" if self.implementation == "control" else self.implementation


@dataclass(frozen=True)
class AccuracyReport:
    title: str  # the model and the protocol, in a line
    settings: dict
    seeds: list[int]
    base_params: int
    base_accuracy: float
    base_eval_seconds: float
    rows: list[RowResult]
    wall_seconds: float
    pass_fraction: float
    no_twin: dict[str, str] = field(default_factory=dict)  # variant -> why PEFT has no twin of it (its record's)
    machine: str = field(default_factory=machine)
    git_commit: str | None = field(default_factory=git_commit)
    date: str = field(default_factory=now)

    @property
    def full(self) -> RowResult:
        return next(r for r in self.rows if r.implementation == "torch")

    @property
    def pass_mark(self) -> float:
        return self.pass_fraction * self.full.mean

    def verdict(self, row: RowResult) -> bool | None:
        return None if row.implementation == "torch" else row.mean >= self.pass_mark

    @property
    def closest(self) -> RowResult:
        """The row whose mean is nearest the mark: the verdict a change of machine would flip first."""
        return min((r for r in self.rows if r.implementation != "torch"), key=lambda r: abs(r.mean - self.pass_mark))

    @property
    def broken(self) -> str | None:
        """Why the benchmark cannot tell a working variant from a broken one, or None."""
        if self.full.mean <= self.base_accuracy:
            return f"full fine-tuning ({self.full.mean:.1%}) does not beat the base ({self.base_accuracy:.1%})"
        passing = [r.variant for r in self.rows if r.implementation == "control" and self.verdict(r)]
        if passing:
            return f"the control rows {', '.join(passing)} pass, broken as they are"
        return None

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows"] = [
            asdict(r) | {"passes": self.verdict(r), "mean_accuracy": r.mean, "spread": r.spread} for r in self.rows
        ]
        out |= {"full_finetune_accuracy": self.full.mean, "pass_mark": self.pass_mark, "broken": self.broken}
        return out

    def markdown(self) -> str:
        n = len(self.seeds)
        lines = [
            self.title,
            "",
            f"| variant | implementation | 4bit/8bit | test accuracy (mean ± sd, {n} seeds) | trainable params | lr | "
            "init time | vs PEFT | peak memory | step time (median) | vs PEFT | eval time | pass |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            quant = "-" if r.quantizable is None else ("yes" if r.quantizable else "no")
            step = "-" if r.step_ratio_vs_peft is None else f"{r.step_ratio_vs_peft:.2f}x"
            init = "-" if r.init_ratio_vs_peft is None else f"{r.init_ratio_vs_peft:.2f}x"
            verdict = self.verdict(r)
            passed = "-" if verdict is None else ("yes" if verdict else "NO")
            lines.append(
                f"| {r.variant} | {r.label} | {quant} | {r.mean:.1%} ± {r.spread * 100:.1f} | "
                f"{r.trainable_params:,} | {r.lr:g} | {_ms(r.init_seconds)} | {init} | "
                f"{r.peak_memory_bytes / 2**20:.1f} MiB | "
                f"{r.median_step_seconds * 1000:.1f} ms | {step} | {r.eval_seconds:.2f} s | {passed} |"
            )
        lines.append(
            f"| base (no fine-tuning) | - | - | {self.base_accuracy:.1%} | 0 | - | - | - | - | - | - | "
            f"{self.base_eval_seconds:.2f} s | - |"
        )
        ours = [r for r in self.rows if r.implementation == "lora-lite"]
        failed = [r.variant for r in ours if not self.verdict(r)]
        controls = [r for r in self.rows if r.implementation == "control"]
        closest = self.closest
        lines += [
            "",
            f"Pass mark: {self.pass_fraction:.0%} of full fine-tuning's mean accuracy, {self.pass_mark:.1%}. "
            f"lora-lite variants passing: {len(ours) - len(failed)}/{len(ours)}"
            + (f" (not: {', '.join(failed)})" if failed else ""),
            "Controls (our variant, its gradients zeroed: it cannot train): "
            + ", ".join(
                f"{r.variant} {r.mean:.1%}, {'passes (BROKEN)' if self.verdict(r) else 'fails'}" for r in controls
            )
            + f"; the base scores {self.base_accuracy:.1%}.",
            f"Nearest the mark: {closest.variant} ({closest.label}), {abs(closest.mean - self.pass_mark) * 100:.1f} "
            f"points away; largest spread over seeds: {max(r.spread for r in self.rows) * 100:.1f} points.",
        ]
        for r in ours:
            if not self.verdict(r) and r.rate_scores:
                scores = ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in sorted(r.rate_scores.items()))
                lines.append(f"{r.variant}'s loss after the rate selection's steps, by rate: {scores}")
        lora = {r.implementation: r for r in self.rows if r.variant == "LoRA"}
        if "lora-lite" in lora and "peft" in lora:
            gap = abs(lora["lora-lite"].mean - lora["peft"].mean) * 100
            lines.append(f"LoRA accuracy, lora-lite vs PEFT: {gap:.1f} points apart")
        if self.no_twin:
            lines.append("Without a PEFT row: " + "; ".join(f"{v} ({why})" for v, why in self.no_twin.items()))
        if self.broken:
            lines.append(f"BROKEN: {self.broken}")
        lines.append(f"{self.date}, {self.machine}, {self.wall_seconds:.0f} s")
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "bench_results.json"
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        styles = {
            "lora-lite": ("o", "tab:blue"),
            "peft": ("x", "tab:orange"),
            "torch": ("s", "tab:green"),
            "control": ("v", "tab:red"),
        }
        for impl, (marker, color) in styles.items():
            pts = [r for r in self.rows if r.implementation == impl]
            xs, ys = [r.trainable_params for r in pts], [r.mean * 100 for r in pts]
            ax.errorbar(xs, ys, yerr=[r.spread * 100 for r in pts], fmt=marker, c=color, label=impl, capsize=2)
            for r in pts if impl != "peft" else []:
                ax.annotate(
                    r.variant, (r.trainable_params, r.mean * 100), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.axhline(self.pass_mark * 100, ls="--", c="gray", label="pass mark")
        ax.axhline(self.base_accuracy * 100, ls=":", c="black", label="base, before fine-tuning")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"test accuracy (%), mean ± sd over {len(self.seeds)} seeds")
        ax.set_title("lora-lite bench: accuracy vs trainable parameters")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@dataclass(frozen=True)
class SpeedRow:
    variant: str
    ours_seconds: float  # median train step
    peft_seconds: float
    ratio: float  # median over steps of ours over PEFT's step run right next to it
    target: float
    ours_init_seconds: float  # attach and init, calibration included
    peft_init_seconds: float
    ours_peak_bytes: int  # the model's tensors plus what one step allocates
    peft_peak_bytes: int

    @property
    def met(self) -> bool:
        return self.ratio <= self.target


@dataclass(frozen=True)
class ForwardOverhead:
    """The hooks' cost: LoRA r=8 on q_proj/v_proj over the bare model, no grad, as median ratios of paired runs."""

    prefill_tokens: int
    prefill_bare_seconds: float
    prefill_lora_seconds: float
    prefill_ratio: float
    decode_bare_seconds: float  # one new token with a KV cache of prefill_tokens
    decode_lora_seconds: float
    decode_ratio: float
    target: float  # for the prefill ratio

    @property
    def met(self) -> bool:
        return self.prefill_ratio <= self.target


@dataclass(frozen=True)
class SpeedReport:
    model: str  # the geometry, in words
    settings: dict
    rows: list[SpeedRow]
    forward: ForwardOverhead
    wall_seconds: float
    device: str
    no_twin: dict[str, str] = field(default_factory=dict)  # variant -> why PEFT has no twin of it (its record's)
    machine: str = field(default_factory=machine)
    git_commit: str | None = field(default_factory=git_commit)
    date: str = field(default_factory=now)

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) | {"met": r.met} for r in self.rows]
        out["forward"] |= {"met": self.forward.met}
        return out

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"lora-lite bench --speed on {self.device}: {self.model}; train steps on batch {s['batch']} x "
            f"{s['tokens']} tokens, {s['dtype']}, r=32 (alpha 64) for the LoRA family, "
            f"{s['steps'] - s['warmup']} timed steps per row, ours and PEFT's alternating",
            "",
            "| variant | step ours | step PEFT | ratio (target) | init ours | init PEFT | peak ours | peak PEFT |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.variant} | {r.ours_seconds * 1000:.1f} ms | {r.peft_seconds * 1000:.1f} ms | {r.ratio:.3f}x "
                f"(<= {r.target:.2f}x) {'ok' if r.met else 'MISSED'} | {_ms(r.ours_init_seconds)} | "
                f"{_ms(r.peft_init_seconds)} | {_mib(r.ours_peak_bytes)} | {_mib(r.peft_peak_bytes)} |"
            )
        if self.no_twin:
            lines += ["", "Without a PEFT twin, so without a ratio:"]
            lines += [f"- {variant}: {why}" for variant, why in self.no_twin.items()]
        f = self.forward
        lines += [
            "",
            f"Forward with LoRA r=8 on q_proj/v_proj over the bare model, no grad: prefill 1 x {f.prefill_tokens} "
            f"tokens {f.prefill_ratio:.3f}x (<= {f.target:.2f}x) {'ok' if f.met else 'MISSED'} "
            f"({f.prefill_lora_seconds * 1000:.2f} ms vs {f.prefill_bare_seconds * 1000:.2f} ms); one-token decode "
            f"with a KV cache {f.decode_ratio:.3f}x ({f.decode_lora_seconds * 1000:.2f} ms vs "
            f"{f.decode_bare_seconds * 1000:.2f} ms)",
            f"{self.date}, {self.machine}, {self.wall_seconds:.0f} s",
        ]
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "speed_results.json"
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
