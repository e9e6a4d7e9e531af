"""The rows a benchmark trains: every compiled variant, PEFT's implementation of the same methods, full fine-tuning.

A method turns a copy of the base model into the model to train (attach an
adapter, wrap it with PEFT, or unfreeze everything). Our rows come from the
compiled index (`lora_lite.generated.VARIANTS`), so a new spec is benchmarked as
soon as it is compiled; each uses its spec's defaults except `r`, capped at
`r_cap`, and the int hypers a layer's check refuses, halved until the model's
layers fit (`fitted`: VB-LoRA's vector_length 256 on 128-wide layers). PEFT's
rows are the twins that the variants' records name
(`lora_lite.peft_records`: peft 0.21's config of the same method, with the same
hypers and targets; the mapping tests/test_peft_parity.py and
tests/test_peft_zoo.py check), one for every variant whose record has a twin;
a record without one says why (`twin_refusals`). The controls are broken on
purpose (`CONTROLS`): they show that the benchmark can tell a variant that
trains from one that does not.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

import lora_lite as ll
from lora_lite.peft_records import peft_twin, record_of
from lora_lite.targets import find_targets

# Learning-rate families, as in the seed's MetaMathQA benchmark: gains (IA3, IA3-FF and the
# AntiPaSTO family) train at a higher rate than the LoRA family, DeLoRA in between.
SEED_LR = {"gain": 5e-3, "delora": 1e-3, "lora": 1e-4}
ORDER = ["LoRA", "PiSSA", "DoRA", "DeLoRA", "AntiPaSTO", "AntiPaSTO-CorDA", "AntiPaSTO-ablate", "AntiPaSTO-arrow"]
ORDER += ["IA3-FF", "EVA", "IA3", "HRA"]  # the seed's table order; new variants follow, by title
# Deliberately broken rows: our variant, attached as usual, with every gradient of its trainable tensors replaced
# by zeros (a tensor hook), so AdamW never moves them and the model stays the base. One low-rank, one gain.
CONTROLS = ("LoRA", "IA3")
CONTROL_BREAKAGE = "gradient zeroed"


@dataclass
class Method:
    title: str  # the method, e.g. "LoRA"
    implementation: str  # "lora-lite", "peft", "torch" (full fine-tuning) or "control" (ours, broken on purpose)
    family: str  # learning-rate family: "gain", "delora", "lora" or "full"
    quantizable: bool | None  # from the spec (None: not a lora-lite row)
    cfg: ll.AdapterConfig | None  # our config (PEFT's rows copy its hypers and targets)
    needs_calibration: bool

    @property
    def key(self) -> str:
        return f"{self.title} ({self.implementation})"

    def build(self, model: nn.Module, calibration: Iterable[dict] | None) -> nn.Module:
        """Make `model` (a fresh copy of the base) into the model to train; return it. `cfg` becomes the config
        fitted to the model's layers (`fitted`), the one the report shows."""
        if self.cfg is not None:
            self.cfg = fitted(self.cfg, model)
        if self.implementation == "torch":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        if self.implementation in ("lora-lite", "control"):
            ll.attach(model, self.cfg, calibration_data=calibration if self.needs_calibration else None)
            if self.implementation == "control":
                for p in model.parameters():
                    if p.requires_grad:
                        p.register_hook(torch.zeros_like)
            return model
        return peft_twin(model, self.cfg, _leaf_names(self.cfg.target_names), calibration)


def fitted(cfg: ll.AdapterConfig, model: nn.Module) -> ll.AdapterConfig:
    """`cfg` with every int hyper (but `seed`) that a target layer's check names halved, round by round, until
    every target layer of `model` passes `Variant.check` or no named hyper is left to halve (attach then says
    what does not fit). A spec's defaults are its paper's, sized for large layers; the benchmark's are small."""
    variant = ll.Variant.for_config(cfg)
    layers = {(t.d_in, t.d_out) for t in find_targets(model, cfg)}
    for _ in range(64):
        problems = [p for d_in, d_out in sorted(layers) for p in variant.check(cfg, d_in, d_out)]
        named = {
            f.name: value // 2
            for f in fields(cfg)
            if f.name != "seed"
            and type(value := getattr(cfg, f.name)) is int
            and value > 1
            and any(re.search(rf"\b{f.name}\b", p) for p in problems)
        }
        if not named:
            break
        cfg = replace(cfg, **named)
    return cfg


def family(title: str) -> str:
    """The variant's learning-rate family, read from its slots so that a new spec needs no entry here: "gain" when
    every tensor it trains is a vector or a scalar (IA3, IA3-FF, the AntiPaSTO family, BEFT, VeRA: they rescale
    what the base computes, with few parameters), DeLoRA's own, else "lora"."""
    if title == "DeLoRA":
        return "delora"
    ll.import_variants()
    variant = next((v for v in ll.Variant.registry.values() if v.title == title), None)
    if variant is None:
        return "lora"
    slots = variant.slots(variant.config_class(), 64, 64)
    return "gain" if all(len(slot.shape) <= 1 for slot in slots if slot.trainable) else "lora"


def seed_lr(title: str) -> float:
    """The seed's learning rate for a method (MetaMathQA -> GSM8K, 5k steps)."""
    return SEED_LR[family(title)]


def ours(r_cap: int | None = None) -> list[Method]:
    """One row per compiled variant, in the seed's table order."""
    from lora_lite.generated import VARIANTS

    rows = []
    for cls_name, module in VARIANTS.items():
        variant = getattr(importlib.import_module(f"lora_lite.generated.{module}"), cls_name)
        cfg = variant.config_class()
        if r_cap is not None and isinstance(getattr(cfg, "r", None), int) and cfg.r > r_cap:
            cfg = replace(cfg, r=r_cap)
        if r_cap is not None and isinstance(getattr(cfg, "group_size", None), int) and cfg.group_size > r_cap:
            cfg = replace(cfg, group_size=r_cap)  # RoAd's groups must divide the small model's d_out, as r fits it
        rows.append(
            Method(variant.title, "lora-lite", family(variant.title), variant.quantizable, cfg, bool(variant.stats))
        )
    rank = {title: i for i, title in enumerate(ORDER)}
    return sorted(rows, key=lambda m: (rank.get(m.title, len(ORDER)), m.title))


def peft_rows(our_rows: list[Method]) -> list[Method]:
    """PEFT's implementation of each of our methods whose record names a twin, with our row's config."""
    rows = []
    for m in our_rows:
        twin = record_of(m.cfg).twin
        if twin is not None:
            rows.append(Method(m.title, "peft", m.family, None, m.cfg, twin.init is not None))
    return rows


def twin_refusals(our_rows: list[Method]) -> dict[str, str]:
    """Why PEFT has no twin of each of our rows that has none, by title (the record's reason)."""
    records = {m.title: record_of(m.cfg) for m in our_rows}
    return {title: record.refused for title, record in records.items() if record.twin is None}


def controls(our_rows: list[Method]) -> list[Method]:
    """The broken-on-purpose twins of our rows named in CONTROLS (same config, gradients zeroed)."""
    return [replace(m, implementation="control", quantizable=None) for m in our_rows if m.title in CONTROLS]


def full_finetune() -> Method:
    return Method("full fine-tune", "torch", "full", None, None, False)


def all_rows(r_cap: int | None = None, with_controls: bool = False) -> list[Method]:
    """Each of our variants followed by PEFT's same method where PEFT has it, the controls if asked, then full
    fine-tuning."""
    rows = []
    mine = ours(r_cap)
    theirs = {m.title: m for m in peft_rows(mine)}
    for m in mine:
        rows.append(m)
        if m.title in theirs:
            rows.append(theirs[m.title])
    return [*rows, *(controls(mine) if with_controls else []), full_finetune()]


def _leaf_names(pattern: str) -> list[str]:
    """Our target regex `q_proj|v_proj` as PEFT's list of module names."""
    names = pattern.split("|")
    if not all(name.replace("_", "").isalnum() for name in names):
        raise ValueError(f"cannot give PEFT the target regex {pattern!r} as module names")
    return names
