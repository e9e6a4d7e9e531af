"""What each variant means to Hugging Face PEFT: one record per variant, read by export, import and the benchmark.

A record says which PEFT adapter type and options a variant is (`options`, the adapter_config.json
entries), how its tensors on one layer become PEFT's (`tensors`: key under the layer -> value), which
of its randomly initialised tensors PEFT's model of the same method holds under which name
(`random_slots`, for the benchmark's paired rows), which PEFT keys `import_peft` reads into
which of our values (`imported`), or why PEFT's format cannot hold it (`refused`).

The package's variants are keyed by name in `RECORDS`. Stating a record in the spec itself would
need new grammar (a `peft ...` statement through every compiler pass), so it lives here instead. A
variant from outside the package gets a record by its math: `record_for` probes its forward on a
small float64 layer with random tensors, and a variant that computes y + (alpha / r) B A x is PEFT
LoRA, one that computes y + (alpha / sqrt(r)) B A x is PEFT LoRA with `use_rslora` (rsLoRA, Kalajdzievski
2023, https://arxiv.org/abs/2312.03732). Anything else is refused with what the probe found.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lora_lite.variant import AdapterConfig, Variant

Tensors = dict[str, Tensor]  # one layer's adapter tensors, by slot name (A, B, m_shift, ...)


@dataclass(frozen=True)
class PeftRecord:
    """What a variant is in PEFT's format; `refused` set means it cannot be exported, and says why."""

    title: str
    peft_type: str | None = None  # "LORA" or "IA3" (what export_peft writes); None when refused
    options: Callable[[AdapterConfig, list[str]], dict[str, object]] | None = None  # cfg, target_modules
    tensors: Callable[[AdapterConfig, Tensors], Tensors] | None = None  # -> PEFT keys under the layer
    random_slots: dict[str, str] = field(default_factory=dict)  # our random slot -> PEFT's parameter name
    refused: str | None = None
    imported: dict[str, str] = field(default_factory=dict)  # what import_peft reads: our value -> PEFT key


def _alpha(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _lora_options(rank: Callable[[AdapterConfig], int], alpha: Callable[[AdapterConfig], float], **extra: object):
    def options(cfg: AdapterConfig, modules: list[str]) -> dict[str, object]:
        return {
            "peft_type": "LORA",
            "r": rank(cfg),
            "lora_alpha": _alpha(alpha(cfg)),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
        } | extra

    return options


def _ia3_options(feedforward: bool):
    def options(cfg: AdapterConfig, modules: list[str]) -> dict[str, object]:
        return {"peft_type": "IA3", "feedforward_modules": modules if feedforward else [], "init_ia3_weights": True}

    return options


def _lora_tensors(cfg: AdapterConfig, slot: Tensors) -> Tensors:
    return {"lora_A.weight": slot["A"], "lora_B.weight": slot["B"]}


def _dora_tensors(cfg: AdapterConfig, slot: Tensors) -> Tensors:
    m = slot["m0"].float() + slot["m_shift"].float()  # our m is m0 + m_shift (see specs/dora.adapter)
    return _lora_tensors(cfg, slot) | {"lora_magnitude_vector": m.to(slot["m_shift"].dtype)}


def _pissa_tensors(cfg: AdapterConfig, slot: Tensors) -> Tensors:
    """PEFT's own PiSSA -> LoRA conversion: A' = [A; A0], B' = [B, -B0] with s B0 A0 = U S Vt, on the original
    base, with rank 2r and lora_alpha 2 alpha (the same scaling s)."""
    s = cfg.alpha / cfg.r
    root = torch.sqrt(slot["S"].float() / s)
    A0 = root[:, None] * slot["Vt"].float()
    B0 = slot["U"].float() * root[None, :]
    dtype = slot["A"].dtype
    return {
        "lora_A.weight": torch.cat([slot["A"].float(), A0]).to(dtype),
        "lora_B.weight": torch.cat([slot["B"].float(), -B0], dim=1).to(dtype),
    }


def _ia3_tensors(shape: tuple[int, int]):
    def tensors(cfg: AdapterConfig, slot: Tensors) -> Tensors:
        return {"ia3_l": slot["g"].reshape(shape)}

    return tensors


_SERVING = "export_peft writes only the LoRA and IA3 formats that serving tools such as vLLM read"
_ANTIPASTO = "gains on the singular values of a residual base are not a PEFT method"

RECORDS: dict[str, PeftRecord] = {
    "lora": PeftRecord(
        "LoRA",
        "LORA",
        _lora_options(lambda c: c.r, lambda c: c.alpha),
        _lora_tensors,
        {"A": "lora_A.default.weight"},
        imported={"A": "lora_A.weight", "B": "lora_B.weight"},
    ),
    "eva": PeftRecord(  # EVA's forward is LoRA's on the unchanged base
        "EVA", "LORA", _lora_options(lambda c: c.r, lambda c: c.alpha), _lora_tensors
    ),
    "dora": PeftRecord(
        "DoRA",
        "LORA",
        _lora_options(lambda c: c.r, lambda c: c.alpha, use_dora=True),
        _dora_tensors,
        {"A": "lora_A.default.weight"},
        imported={"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"},  # m = m0 + m_shift
    ),
    "pissa": PeftRecord("PiSSA", "LORA", _lora_options(lambda c: 2 * c.r, lambda c: 2 * c.alpha), _pissa_tensors),
    "ia3": PeftRecord("IA3", "IA3", _ia3_options(False), _ia3_tensors((-1, 1)), imported={"g": "ia3_l"}),
    "ia3_ff": PeftRecord("IA3-FF", "IA3", _ia3_options(True), _ia3_tensors((1, -1)), imported={"g": "ia3_l"}),
    "hra": PeftRecord(
        "HRA",
        random_slots={"U": "hra_u.default"},
        refused=f"PEFT has HRA (its apply_GS=False form computes the same function), but {_SERVING}",
    ),
    "delora": PeftRecord(
        "DeLoRA", random_slots={"A": "delora_A.default"}, refused=f"PEFT has DeLoRA (same function), but {_SERVING}"
    ),
    # Issue 13's methods (tests/test_peft_zoo.py checks each against PEFT 0.21).
    "rs_lora": PeftRecord(
        "RSLoRA",
        "LORA",
        _lora_options(lambda c: c.r, lambda c: c.alpha, use_rslora=True),
        _lora_tensors,
        {"A": "lora_A.default.weight"},
        imported={"A": "lora_A.weight", "B": "lora_B.weight"},
    ),
    "rsdora": PeftRecord(
        "RSDoRA",
        "LORA",
        _lora_options(lambda c: c.r, lambda c: c.alpha, use_dora=True, use_rslora=True),
        _dora_tensors,
        {"A": "lora_A.default.weight"},
        imported={"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"},
    ),
    "lorafa": PeftRecord(  # PEFT LoRA with lora_A frozen (PEFT's LoRA-FA optimizer): the file is plain LoRA's
        "LoRA-FA", "LORA", _lora_options(lambda c: c.r, lambda c: c.alpha), _lora_tensors
    ),
    "vera": PeftRecord(
        "VeRA",
        refused=f"PEFT has VeRA, with one A and B shared by all layers where ours holds a pair per layer "
        f"(the same function on each layer), and {_SERVING}",
    ),
    "loha": PeftRecord(
        "LoHa",
        random_slots={"w1a0": "hada_w1_a.default", "w1b0": "hada_w1_b.default", "w2a0": "hada_w2_a.default"},
        refused=f"PEFT has LoHa (same function), but {_SERVING}",
    ),
    "adalora": PeftRecord(
        "AdaLoRA",
        random_slots={"Q": "lora_A.default", "P": "lora_B.default"},
        refused=f"PEFT has AdaLoRA (same SVD-form function, without rank allocation here), but {_SERVING}",
    ),
    "hira": PeftRecord(
        "HiRA", random_slots={"A": "hira_A.default"}, refused=f"PEFT has HiRA (same function), but {_SERVING}"
    ),
    "beft": PeftRecord("BEFT", refused=f"PEFT has BEFT (same function), but {_SERVING}"),
    "antipasto": PeftRecord("AntiPaSTO", refused=f"PEFT has no AntiPaSTO: {_ANTIPASTO}"),
    "antipasto_ablate": PeftRecord("AntiPaSTO-ablate", refused=f"PEFT has no AntiPaSTO-ablate: {_ANTIPASTO}"),
    "antipasto_arrow": PeftRecord("AntiPaSTO-arrow", refused=f"PEFT has no AntiPaSTO-arrow: {_ANTIPASTO}"),
    "antipasto_corda": PeftRecord(
        "AntiPaSTO-CorDA",
        refused="PEFT has no AntiPaSTO-CorDA: PEFT's CorDA initialises a plain LoRA, while this variant trains "
        "gains on the singular values of a residual base",
    ),
    "lokr": PeftRecord(
        "LoKr",
        random_slots={"w2_a0": "lokr_w2_a.default", "w2_b0": "lokr_w2_b.default"},
        refused=f"PEFT has LoKr (same function, with decompose_factor = f), but {_SERVING}",
    ),
    "miss": PeftRecord("MiSS", refused=f"PEFT has MiSS (same function, init_weights=True), but {_SERVING}"),
    "miss_mini": PeftRecord("MiSS-mini", refused=f"PEFT has MiSS (same function, init_weights='mini'), but {_SERVING}"),
    "gralora": PeftRecord(  # no random_slots: our A is PEFT's gralora_A with each block transposed, not a reshape
        "GraLoRA", refused=f"PEFT has GraLoRA (same function, hybrid_r = 0), but {_SERVING}"
    ),
}


def exportable_titles() -> list[str]:
    """Titles of the package's variants that export_peft writes, in RECORDS order."""
    return [record.title for record in RECORDS.values() if record.refused is None]


def record_for(variant: type[Variant], cfg: AdapterConfig) -> PeftRecord:
    """The variant's record: the package's by name, a user variant's by its math (see the module docstring)."""
    if variant.__module__.startswith("lora_lite.generated.") and variant.name in RECORDS:
        return RECORDS[variant.name]
    return _probe(variant, cfg)


def _probe(variant: type[Variant], cfg: AdapterConfig) -> PeftRecord:
    """Match a user variant against PEFT LoRA and rsLoRA by running its forward; refuse with what differs."""
    title = variant.title
    names = {f.name for f in cfg.hyper_fields()}
    if variant.site != "output" or variant.has_residual:
        why = "its hook is at the layer input" if variant.site != "output" else "it replaces the layer weight"
        return PeftRecord(title, refused=f"{why}, and PEFT LoRA adds B A x to an unchanged layer's output")
    if not {"r", "alpha"} <= names:
        return PeftRecord(title, refused="PEFT LoRA needs hypers named r and alpha (PEFT's r and lora_alpha)")
    r = cfg.r
    d_in, d_out = r + 5, r + 3  # distinct from each other and from r: shapes say which tensor is which
    slots = variant.slots(cfg, d_in, d_out)
    role = {(r, d_in): "A", (d_out, r): "B"}
    found = {role.get(tuple(s.shape)): s.name for s in slots if s.trainable}
    if len(slots) != 2 or set(found) != {"A", "B"}:
        shapes = ", ".join(f"{s.name} {list(s.shape)}{'' if s.trainable else ' (frozen)'}" for s in slots)
        return PeftRecord(
            title,
            refused=f"PEFT LoRA holds two trained tensors, A [r, d_in] and B [d_out, r]; on a {d_out} x {d_in} layer "
            f"with r={r} this variant holds {shapes}",
        )
    probe = dataclasses.replace(cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(d_in, d_out, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    setattr(layer, f"lora_{found['A']}", A)
    setattr(layer, f"lora_{found['B']}", B)
    x = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = layer(x)
            delta = variant.output(layer, probe, x, y) - y
    except Exception as exc:  # the variant's own code: any error means it is not PEFT LoRA
        return PeftRecord(title, refused=f"its forward failed on a probe layer ({type(exc).__name__}: {exc})")
    BAx = x @ A.T @ B.T
    scales = {"LoRA (alpha / r)": cfg.alpha / r, "rsLoRA (alpha / sqrt(r))": cfg.alpha / math.sqrt(r)}
    for name, s in scales.items():
        if torch.allclose(delta, s * BAx, rtol=1e-9, atol=1e-9 * BAx.abs().max().item()):
            rslora = name.startswith("rsLoRA")
            return PeftRecord(
                title,
                "LORA",
                _lora_options(lambda c: c.r, lambda c: c.alpha, use_rslora=rslora),
                lambda c, slot: {"lora_A.weight": slot[found["A"]], "lora_B.weight": slot[found["B"]]},
                {found["A"]: "lora_A.default.weight"},
            )
    off = min((delta - s * BAx).abs().max().item() for s in scales.values())
    return PeftRecord(
        title,
        refused="its forward is not PEFT LoRA's y + (alpha / r) B A x nor rsLoRA's y + (alpha / sqrt(r)) B A x "
        f"(on a probe layer with random A, B it differs from the closer one by {off:.3g})",
    )
