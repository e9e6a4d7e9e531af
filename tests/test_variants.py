"""One table of variants crossed with the shared checks every variant must pass.

A new spec gets every check by adding one row to CASES.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, tiny_qwen
from torch import Tensor, nn

import lora_lite as ll
from lora_lite import verify
from lora_lite.variant import AdapterConfig, Slot, Variant
from lora_lite.verify import Model, attach, tiny_mlp, train, trainable

__all__ = ["CASES", "attach", "case_of", "setup", "trainable"]  # test_torch_compile's imports


@dataclass(kw_only=True)
class OutBiasConfig(AdapterConfig):
    """A hand-written variant: a trainable bias added to the layer output (BitFit-like)."""

    scale: float = 1.0


class OutBias(Variant):
    """Hand-written, not compiled: the runtime must treat it exactly like generated code."""

    name = "test_out_bias"
    title = "OutBias"
    config_class = OutBiasConfig
    site = "output"
    quantizable = True
    init_reads_weight = False

    @staticmethod
    def slots(cfg: OutBiasConfig, d_in: int, d_out: int) -> list[Slot]:
        return [Slot("b", (d_out,), trainable=True)]

    @staticmethod
    def init(
        cfg: OutBiasConfig, d_in: int, d_out: int, W: Tensor | None, stats: dict, device: torch.device
    ) -> dict[str, Tensor]:
        return {"b": torch.zeros(d_out, device=device)}

    @staticmethod
    def output(layer: nn.Module, cfg: OutBiasConfig, x: Tensor, y: Tensor) -> Tensor:
        return y + cfg.scale * layer.lora_b.to(x.dtype)


def qwen_model() -> Model:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    return Model(tiny_qwen(), ids, vocab=VOCAB)


mlp_model = tiny_mlp  # the model `lora-lite verify` runs on


ALL = {"target_names": None}
CASES: dict[str, tuple[Callable[..., AdapterConfig], Callable[[], Model], dict]] = {
    "lora-qwen": (lambda **kw: ll.LoRAConfig(r=4, **kw), qwen_model, {}),
    "lora-mlp": (lambda **kw: ll.LoRAConfig(r=4, **kw), mlp_model, ALL),
    "pissa-qwen": (lambda **kw: ll.PiSSAConfig(r=4, **kw), qwen_model, {}),
    "pissa-mlp": (lambda **kw: ll.PiSSAConfig(r=4, **kw), mlp_model, ALL),
    "dora-qwen": (lambda **kw: ll.DoRAConfig(r=4, **kw), qwen_model, {}),
    "dora-mlp": (lambda **kw: ll.DoRAConfig(r=4, **kw), mlp_model, ALL),
    "ia3-qwen": (lambda **kw: ll.IA3Config(**kw), qwen_model, {}),
    "ia3-mlp": (lambda **kw: ll.IA3Config(**kw), mlp_model, ALL),
    "ia3ff-qwen": (lambda **kw: ll.IA3FFConfig(**kw), qwen_model, {}),
    "ia3ff-mlp": (lambda **kw: ll.IA3FFConfig(**kw), mlp_model, ALL),
    "delora-qwen": (lambda **kw: ll.DeLoRAConfig(r=4, **kw), qwen_model, {}),
    "delora-mlp": (lambda **kw: ll.DeLoRAConfig(r=4, **kw), mlp_model, ALL),
    "hra-qwen": (lambda **kw: ll.HRAConfig(r=4, **kw), qwen_model, {}),
    "hra-mlp": (lambda **kw: ll.HRAConfig(r=4, **kw), mlp_model, ALL),
    "eva-qwen": (lambda **kw: ll.EVAConfig(r=4, **kw), qwen_model, {}),
    "eva-mlp": (lambda **kw: ll.EVAConfig(r=4, **kw), mlp_model, ALL),
    "antipasto-qwen": (lambda **kw: ll.AntiPaSTOConfig(r=8, **kw), qwen_model, {}),
    "antipasto-mlp": (lambda **kw: ll.AntiPaSTOConfig(r=4, **kw), mlp_model, ALL),
    "corda-qwen": (lambda **kw: ll.AntiPaSTOCorDAConfig(r=8, **kw), qwen_model, {}),
    "corda-mlp": (lambda **kw: ll.AntiPaSTOCorDAConfig(r=4, **kw), mlp_model, ALL),
    "ablate-qwen": (lambda **kw: ll.AntiPaSTOAblateConfig(r=8, **kw), qwen_model, {}),
    "ablate-mlp": (lambda **kw: ll.AntiPaSTOAblateConfig(r=4, **kw), mlp_model, ALL),
    "arrow-qwen": (lambda **kw: ll.AntiPaSTOArrowConfig(r=8, k=4, **kw), qwen_model, {}),
    "arrow-mlp": (lambda **kw: ll.AntiPaSTOArrowConfig(r=4, k=2, **kw), mlp_model, ALL),
    "rslora-qwen": (lambda **kw: ll.RSLoRAConfig(r=4, **kw), qwen_model, {}),
    "rslora-mlp": (lambda **kw: ll.RSLoRAConfig(r=4, **kw), mlp_model, ALL),
    "lorafa-qwen": (lambda **kw: ll.LoRAFAConfig(r=4, **kw), qwen_model, {}),
    "lorafa-mlp": (lambda **kw: ll.LoRAFAConfig(r=4, **kw), mlp_model, ALL),
    "vera-qwen": (lambda **kw: ll.VeRAConfig(r=8, **kw), qwen_model, {}),
    "vera-mlp": (lambda **kw: ll.VeRAConfig(r=4, **kw), mlp_model, ALL),
    "vblora-qwen": (lambda **kw: ll.VBLoRAConfig(r=4, num_vectors=32, vector_length=16, **kw), qwen_model, {}),
    "vblora-mlp": (lambda **kw: ll.VBLoRAConfig(r=4, num_vectors=16, vector_length=4, **kw), mlp_model, ALL),
    "pvera-qwen": (lambda **kw: ll.PVeRAConfig(r=8, **kw), qwen_model, {}),
    "pvera-mlp": (lambda **kw: ll.PVeRAConfig(r=4, **kw), mlp_model, ALL),
    # RandLoRA: both forms of its conditional on the MLP (up 12 -> 20, down 20 -> 8), ceil(8 / 3) bases on down
    "randlora-qwen": (lambda **kw: ll.RandLoRAConfig(r=8, **kw), qwen_model, {}),
    "randlora-mlp": (lambda **kw: ll.RandLoRAConfig(r=3, **kw), mlp_model, ALL),
    "loha-qwen": (lambda **kw: ll.LoHaConfig(r=4, **kw), qwen_model, {}),
    "loha-mlp": (lambda **kw: ll.LoHaConfig(r=4, **kw), mlp_model, ALL),
    "adalora-qwen": (lambda **kw: ll.AdaLoRAConfig(r=4, **kw), qwen_model, {}),
    "adalora-mlp": (lambda **kw: ll.AdaLoRAConfig(r=4, **kw), mlp_model, ALL),
    "rsdora-qwen": (lambda **kw: ll.RSDoRAConfig(r=4, **kw), qwen_model, {}),
    "rsdora-mlp": (lambda **kw: ll.RSDoRAConfig(r=4, **kw), mlp_model, ALL),
    "hira-qwen": (lambda **kw: ll.HiRAConfig(r=4, **kw), qwen_model, {}),
    "hira-mlp": (lambda **kw: ll.HiRAConfig(r=4, **kw), mlp_model, ALL),
    "beft-qwen": (lambda **kw: ll.BEFTConfig(**kw), qwen_model, {}),
    # `up` only: merging BEFT into `down`, which has no bias, is refused (test_beft_merge_needs_a_layer_bias)
    "beft-mlp": (lambda **kw: ll.BEFTConfig(**kw), mlp_model, {"target_names": "up"}),
    "oft-qwen": (lambda **kw: ll.OFTConfig(b=8, **kw), qwen_model, {}),
    "oft-mlp": (lambda **kw: ll.OFTConfig(b=4, **kw), mlp_model, ALL),
    "oftcayley-qwen": (lambda **kw: ll.OFTCayleyConfig(b=8, **kw), qwen_model, {}),
    "oftcayley-mlp": (lambda **kw: ll.OFTCayleyConfig(b=4, **kw), mlp_model, ALL),
    "psoft-qwen": (lambda **kw: ll.PSOFTConfig(r=8, **kw), qwen_model, {}),
    "psoft-mlp": (lambda **kw: ll.PSOFTConfig(r=4, **kw), mlp_model, ALL),
    "glora-qwen": (lambda **kw: ll.GLoRAConfig(r=4, **kw), qwen_model, {}),
    "glora-mlp": (lambda **kw: ll.GLoRAConfig(r=4, **kw), mlp_model, ALL),
    "deft-qwen": (lambda **kw: ll.DEFTConfig(r=4, **kw), qwen_model, {}),
    "deft-mlp": (lambda **kw: ll.DEFTConfig(r=4, **kw), mlp_model, ALL),
    "peanut-qwen": (lambda **kw: ll.PEANuTConfig(r=4, **kw), qwen_model, {}),
    "peanut-mlp": (lambda **kw: ll.PEANuTConfig(r=4, **kw), mlp_model, ALL),
    # RoAd's group size divides every target's d_out: 128 and 64 (Qwen), 20 and 8 (MLP).
    "road-qwen": (lambda **kw: ll.RoAdConfig(group_size=16, **kw), qwen_model, {}),
    "road-mlp": (lambda **kw: ll.RoAdConfig(group_size=4, **kw), mlp_model, ALL),
    "road2-qwen": (lambda **kw: ll.RoAd2Config(group_size=64, **kw), qwen_model, {}),
    "road2-mlp": (lambda **kw: ll.RoAd2Config(group_size=4, **kw), mlp_model, ALL),
    "road4-qwen": (lambda **kw: ll.RoAd4Config(group_size=32, **kw), qwen_model, {}),
    "road4-mlp": (lambda **kw: ll.RoAd4Config(group_size=2, **kw), mlp_model, ALL),
    "tinylora-qwen": (lambda **kw: ll.TinyLoRAConfig(r=2, u=8, **kw), qwen_model, {}),
    "tinylora-mlp": (lambda **kw: ll.TinyLoRAConfig(r=2, u=4, **kw), mlp_model, ALL),
    "boft-qwen": (lambda **kw: ll.BOFTConfig(b=4, n_butterfly_factor=3, **kw), qwen_model, {}),
    "boft-mlp": (lambda **kw: ll.BOFTConfig(b=2, n_butterfly_factor=2, **kw), mlp_model, ALL),
    "c3a-qwen": (lambda **kw: ll.C3AConfig(b=16, **kw), qwen_model, {}),
    "c3a-mlp": (lambda **kw: ll.C3AConfig(b=4, **kw), mlp_model, ALL),
    "fourierft-qwen": (lambda **kw: ll.FourierFTConfig(n_frequency=200, **kw), qwen_model, {}),
    "fourierft-mlp": (lambda **kw: ll.FourierFTConfig(n_frequency=40, **kw), mlp_model, ALL),
    "waveft-qwen": (lambda **kw: ll.WaveFTConfig(n_frequency=200, **kw), qwen_model, {}),
    "waveft-mlp": (lambda **kw: ll.WaveFTConfig(n_frequency=40, **kw), mlp_model, ALL),
    "lokr-qwen": (lambda **kw: ll.LoKrConfig(r=4, f=4, **kw), qwen_model, {}),
    "lokr-mlp": (lambda **kw: ll.LoKrConfig(r=4, f=2, **kw), mlp_model, ALL),
    "miss-qwen": (lambda **kw: ll.MiSSConfig(r=16, **kw), qwen_model, {}),
    "miss-mlp": (lambda **kw: ll.MiSSConfig(r=5, **kw), mlp_model, ALL),  # 5 does not divide up's d_in (12)
    "missmini-qwen": (lambda **kw: ll.MiSSMiniConfig(r=16, mini_r=8, **kw), qwen_model, {}),
    "missmini-mlp": (lambda **kw: ll.MiSSMiniConfig(r=5, mini_r=4, **kw), mlp_model, ALL),
    "gralora-qwen": (lambda **kw: ll.GraLoRAConfig(r=8, k=2, **kw), qwen_model, {}),
    "gralora-mlp": (lambda **kw: ll.GraLoRAConfig(r=8, k=4, **kw), mlp_model, ALL),  # 4 divides 12, 20 and 8
    # SHiRA's k = r * (d_in + d_out) entries fit every target: up 12 -> 20 and down 20 -> 8 take r <= 5.
    "shira-qwen": (lambda **kw: ll.SHiRAConfig(r=4, **kw), qwen_model, {}),
    "shira-mlp": (lambda **kw: ll.SHiRAConfig(r=2, **kw), mlp_model, ALL),
    "handwritten-mlp": (lambda **kw: OutBiasConfig(**kw), mlp_model, ALL),
}


def setup(case: str, dtype: torch.dtype = torch.float32) -> tuple[Model, AdapterConfig]:
    make_cfg, make_model, extra = CASES[case]
    return make_model(), make_cfg(dtype=dtype, **extra)


def case_of(case: str) -> verify.Case:
    make_cfg, make_model, extra = CASES[case]
    return verify.Case(make_model, lambda dtype: make_cfg(dtype=dtype, **extra))


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


# The shared checks are lora_lite.verify's, the ones `lora-lite verify` runs on a researcher's variant.


def test_identity_at_init(case: str) -> None:
    verify.identity_at_init(case_of(case))


def test_gradients_reach_only_adapter_params(case: str) -> None:
    verify.gradients_reach_only_adapter(case_of(case))


def test_training_changes_output(case: str) -> None:
    verify.training_changes_output(case_of(case))


def test_save_then_load_into_fresh_model(case: str) -> None:
    verify.save_load_exact(case_of(case))


def test_detach_restores_base_bit_for_bit(case: str) -> None:
    verify.detach_bit_exact(case_of(case))


def test_merge_gives_the_adapted_outputs_or_the_compilers_reason(case: str) -> None:
    detail = verify.merges_exactly(case_of(case))
    generated = Variant.for_config(case_of(case).config(torch.float32)).spec_hash is not None
    assert detail.startswith("max diff") if generated else detail.startswith("refused: ")


# The seed's learning rates: IA3, IA3-FF and the AntiPaSTO family 5e-3, DeLoRA 1e-3, the others 1e-4.
SEED_LR = {"ia3": 5e-3, "ia3ff": 5e-3, "antipasto": 5e-3, "corda": 5e-3, "ablate": 5e-3, "arrow": 5e-3}
SEED_LR |= {"delora": 1e-3}


# PEFT's road_4 starts its cosine angles theta1 at 0, where cos is stationary: their gradient, -alpha1 sin(theta1)
# (P y) . g, is 0 there, so they never move (in PEFT too; tests/test_peft_road.py matches it). Only they are stuck.
STATIONARY_AT_INIT = {"road4": "theta1"}


def test_bf16_adapter_every_param_moves_at_the_seed_learning_rate(case: str) -> None:
    lr = SEED_LR.get(case.split("-")[0], 1e-4)
    stuck = STATIONARY_AT_INIT.get(case.split("-")[0])
    if stuck is None:
        verify.bf16_adapters_move(case_of(case), lr=lr)  # a plain AdamW, as the seed
        return
    with pytest.raises(verify.CheckFailed) as failed:
        verify.bf16_adapters_move(case_of(case), lr=lr)
    names = re.findall(r"'([^']+)'", str(failed.value))  # the stuck tensors, listed by the check
    assert names and {n.rsplit(".lora_", 1)[1] for n in names} == {stuck}


def moved_fraction(dtype: torch.dtype) -> float:
    """LoRA on a bf16 Qwen, 3 AdamW steps at lr 1e-4: the fraction of A's entries that changed."""
    m = qwen_model()
    m.module.to(torch.bfloat16)
    attach(m, ll.LoRAConfig(r=4, dtype=dtype))
    A = {n: p.detach().clone() for n, p in trainable(m.module).items() if n.endswith("lora_A")}
    train(m, steps=3, lr=1e-4)
    params = trainable(m.module)
    return sum((params[n].detach() != a).sum().item() for n, a in A.items()) / sum(a.numel() for a in A.values())


def test_float32_adapter_is_the_master_copy_for_a_bf16_model() -> None:
    """README (Dtypes): in bf16 most of A's entries stay put at lr 1e-4; a float32 adapter moves them all."""
    assert moved_fraction(torch.bfloat16) < 0.5
    assert moved_fraction(torch.float32) == 1.0


def test_trainable_count_matches_slots(case: str) -> None:
    m, cfg = setup(case)
    names = attach(m, cfg)
    variant = Variant.for_config(cfg)
    layers = [m.module.get_submodule(n) for n in names]
    expected = sum(variant.num_trainable(cfg, layer.in_features, layer.out_features) for layer in layers)
    largest = max(layer.in_features for layer in layers), max(layer.out_features for layer in layers)
    expected += variant.num_trainable_shared(cfg, *largest)  # shared tensors (VB-LoRA's bank): counted once
    assert sum(p.numel() for p in trainable(m.module).values()) == expected


def test_beft_merge_needs_a_layer_bias() -> None:
    """BEFT adds a bias: on a layer without one, merge refuses and says why, leaving the adapter attached."""
    m = mlp_model()
    attach(m, ll.BEFTConfig(target_names="down"))
    with torch.no_grad():
        m.module.down.lora_b_v.add_(0.1)
        before = m.out()
    with pytest.raises(ll.MergeError, match="down has no bias"):
        ll.merge(m.module)
    with torch.no_grad():
        assert torch.equal(m.out(), before)
