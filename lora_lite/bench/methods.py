"""The rows a benchmark trains: every compiled variant, PEFT's implementation of the same methods, full fine-tuning.

A method turns a copy of the base model into the model to train (attach an
adapter, wrap it with PEFT, or unfreeze everything). Our rows come from the
compiled index (`lora_lite.generated.VARIANTS`), so a new spec is benchmarked as
soon as it is compiled; each uses its spec's defaults except `r`, capped at
`r_cap`. PEFT's rows use the same hypers and targets as ours (peft 0.21; the
mapping is the one tests/test_peft_parity.py checks). The controls are broken on
purpose (`CONTROLS`): they show that the benchmark can tell a variant that
trains from one that does not.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

import lora_lite as ll
from lora_lite.peft_records import RECORDS

# Learning-rate families, as in the seed's MetaMathQA benchmark: gains (IA3, IA3-FF and the
# AntiPaSTO family) train at a higher rate than the LoRA family, DeLoRA in between.
SEED_LR = {"gain": 5e-3, "delora": 1e-3, "lora": 1e-4}
PEFT_METHODS = ("LoRA", "PiSSA", "DoRA", "DeLoRA", "IA3", "IA3-FF", "HRA", "EVA")
# Randomly initialised slots and PEFT's name for each (under the target layer): `copy_init` gives PEFT's row
# the initial values of ours, so the two differ only in the implementation, not in the random draw.
RANDOM_SLOTS = {record.title: record.random_slots for record in RECORDS.values() if record.random_slots}
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
        """Make `model` (a fresh copy of the base) into the model to train; return it."""
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
        return _peft_model(self, model, calibration)


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
        rows.append(
            Method(variant.title, "lora-lite", family(variant.title), variant.quantizable, cfg, bool(variant.stats))
        )
    rank = {title: i for i, title in enumerate(ORDER)}
    return sorted(rows, key=lambda m: (rank.get(m.title, len(ORDER)), m.title))


def peft_rows(our_rows: list[Method]) -> list[Method]:
    """PEFT's implementation of each of our methods that PEFT has."""
    return [
        Method(m.title, "peft", m.family, None, m.cfg, m.title == "EVA") for m in our_rows if m.title in PEFT_METHODS
    ]


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


def copy_init(ours: nn.Module, theirs: nn.Module, title: str) -> int:
    """Copy our randomly initialised adapter tensors into PEFT's model of the same method; return how many."""
    mapping = RANDOM_SLOTS.get(title, {})
    params = dict(theirs.named_parameters())
    copied = 0
    for key, value in ll.adapter_state_dict(ours).items():
        layer, slot = key.rsplit(".lora_", 1)
        if slot in mapping:
            target = params[f"base_model.model.{layer}.{mapping[slot]}"]
            with torch.no_grad():
                target.copy_(value.reshape(target.shape))
            copied += 1
    return copied


def _leaf_names(pattern: str) -> list[str]:
    """Our target regex `q_proj|v_proj` as PEFT's list of module names."""
    names = pattern.split("|")
    if not all(name.replace("_", "").isalnum() for name in names):
        raise ValueError(f"cannot give PEFT the target regex {pattern!r} as module names")
    return names


def _peft_model(method: Method, model: nn.Module, calibration: Iterable[dict] | None) -> nn.Module:
    import peft

    cfg = method.cfg
    targets = _leaf_names(cfg.target_names)
    builders: dict[str, Callable[[], object]] = {
        "LoRA": lambda: peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets),
        "PiSSA": lambda: peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, init_lora_weights="pissa"
        ),
        "DoRA": lambda: peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets, use_dora=True),
        "DeLoRA": lambda: peft.DeloraConfig(r=cfg.r, delora_lambda=cfg.lambda0, target_modules=targets),
        "IA3": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=[]),
        "IA3-FF": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=targets),
        "HRA": lambda: peft.HRAConfig(r=cfg.r, target_modules=targets, apply_GS=False),
        "EVA": lambda: peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            target_modules=targets,
            init_lora_weights="eva",
            eva_config=peft.EvaConfig(rho=1.0, use_label_mask=False),  # one rank for every layer, as ours
        ),
    }
    wrapped = peft.get_peft_model(model, builders[method.title]())
    if method.title == "EVA":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        initialize_lora_eva_weights(wrapped, dataloader=list(calibration), show_progress_bar=False)
    return wrapped
