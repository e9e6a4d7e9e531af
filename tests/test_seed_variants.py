"""The seed's variants table: parameter counts on its geometry, calibration, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_mlp, tiny_qwen
from test_runtime import assert_unchanged, snapshot
from transformers import Qwen3ForCausalLM

import lora_lite as ll
from lora_lite.calibration import calibrate
from lora_lite.targets import find_targets
from lora_lite.tiny import qwen3_0_6b_config
from lora_lite.variant import Variant

QV = "q_proj|v_proj"
# Seed geometry: Qwen3-0.6B; q_proj/v_proj r=32 unless said; IA3 on k/v; IA3-FF on down_proj; AntiPaSTO r=256.
SEED_COUNTS = {
    "LoRA": (ll.LoRAConfig, {"r": 32}, 4_587_520),
    "PiSSA": (ll.PiSSAConfig, {"r": 32}, 4_587_520),
    "EVA": (ll.EVAConfig, {"r": 32}, 4_587_520),
    "DoRA": (ll.DoRAConfig, {"r": 32}, 4_673_536),
    "DeLoRA": (ll.DeLoRAConfig, {"r": 32}, 4_587_576),
    "HRA": (ll.HRAConfig, {"r": 32}, 1_835_008),
    "IA3": (ll.IA3Config, {}, 57_344),
    "IA3-FF": (ll.IA3FFConfig, {}, 86_016),
    "AntiPaSTO": (ll.AntiPaSTOConfig, {"r": 256}, 14_336),
    "AntiPaSTO-CorDA": (ll.AntiPaSTOCorDAConfig, {"r": 256}, 14_336),
    "AntiPaSTO-ablate": (ll.AntiPaSTOAblateConfig, {"r": 256}, 14_392),
    "AntiPaSTO-arrow": (ll.AntiPaSTOArrowConfig, {"r": 256}, 17_472),
    # Issue 13's PEFT methods on the same layers (frozen tensors not counted; VeRA at PEFT's r=256).
    "RSLoRA": (ll.RSLoRAConfig, {"r": 32}, 4_587_520),
    "RSDoRA": (ll.RSDoRAConfig, {"r": 32}, 4_673_536),
    "LoRA-FA": (ll.LoRAFAConfig, {"r": 32}, 2_752_512),  # B only: (2048 + 1024) * 32 * 28
    "VeRA": (ll.VeRAConfig, {}, 100_352),  # (d_out + r) per layer: (2048 + 256 + 1024 + 256) * 28
    # r (d_in + d_out) / 256 * 256 logits per layer, (12 + 8) * 4 * 256 * 28 (the [256, 256] bank is counted once,
    # by num_trainable_shared)
    "VB-LoRA": (ll.VBLoRAConfig, {}, 573_440),
    "PVeRA": (ll.PVeRAConfig, {}, 114_688),  # (d_out + 2 r) per layer: (2048 + 512 + 1024 + 512) * 28
    "LoHa": (ll.LoHaConfig, {"r": 32}, 9_175_040),  # twice LoRA's
    "AdaLoRA": (ll.AdaLoRAConfig, {"r": 32}, 4_589_312),  # LoRA's + r per layer
    "HiRA": (ll.HiRAConfig, {"r": 32}, 4_587_520),
    "BEFT": (ll.BEFTConfig, {}, 28_672),  # v_proj's d_out 1024 on each of 28 layers
    "OFT": (ll.OFTConfig, {}, 888_832),  # (1024 / 32) blocks of 32*31/2 on each of 56 layers (d_in = 1024)
    "OFT-Cayley": (ll.OFTCayleyConfig, {}, 888_832),
    "PSOFT": (ll.PSOFTConfig, {}, 31_360),  # (32*31/2 + 2*32) on each of 56 layers
    "GLoRA": (ll.GLoRAConfig, {}, 2_293_760),  # 2 r (d_in + d_out): twice LoRA's at r = 8
    "DEFT": (ll.DEFTConfig, {}, 1_146_880),  # r (d_in + d_out) at r = 8
    "PEANuT": (ll.PEANuTConfig, {}, 5_505_024),  # 2 r d_out at r = 32
    "RoAd": (ll.RoAdConfig, {}, 86_016),  # d_out per layer (d_out/2 angles and scales): (2048 + 1024) * 28
    "RoAd-2": (ll.RoAd2Config, {}, 172_032),  # 2 d_out per layer
    "RoAd-4": (ll.RoAd4Config, {}, 344_064),  # 4 d_out per layer
    "TinyLoRA": (ll.TinyLoRAConfig, {}, 3_584),  # u = 64 per layer, 56 layers
    "BOFT": (ll.BOFTConfig, {}, 315_392),  # b=4, one factor: (1024 * 4 + d_out) on q_proj and v_proj, 28 layers
    # d_out * d_in / b per layer at PEFT's block_size 256: (2048 + 1024) * 1024 / 256 * 28
    "C3A": (ll.C3AConfig, {"b": 256}, 344_064),
    "FourierFT": (ll.FourierFTConfig, {}, 56_000),  # n_frequency = 1000 per layer, 56 layers
    "WaveFT": (ll.WaveFTConfig, {"n_frequency": 2592}, 145_152),  # at PEFT's n_frequency, 56 layers
    # PEFT's defaults: LoKr r=8 with decompose_factor -1, which is f=32 on 1024 and 2048: 32*32 + 8*(64 + 32) on
    # q_proj, 32*32 + 8*(32 + 32) on v_proj; MiSS r=64 (d_out*r); MiSS-mini r=64, mini_r=1; GraLoRA r=32 (LoRA's).
    "LoKr": (ll.LoKrConfig, {"f": 32}, 93_184),
    "MiSS": (ll.MiSSConfig, {}, 5_505_024),
    "MiSS-mini": (ll.MiSSMiniConfig, {}, 3_584),
    "GraLoRA": (ll.GraLoRAConfig, {}, 4_587_520),
    # RandLoRA at PEFT's r=32: r n + n min(d_in, d_out) per layer, n = 1024 / 32 = 32 bases, on 56 layers
    "RandLoRA": (ll.RandLoRAConfig, {}, 1_892_352),
    "SHiRA": (ll.SHiRAConfig, {}, 4_587_520),  # PEFT's r = 32: r (d_in + d_out) entries, LoRA's count
}


@pytest.fixture(scope="module")
def qwen3_0_6b_on_meta() -> torch.nn.Module:
    config = qwen3_0_6b_config(tie_word_embeddings=False)
    with torch.device("meta"):
        return Qwen3ForCausalLM(config)


@pytest.mark.parametrize("title", sorted(SEED_COUNTS))
def test_trainable_counts_on_the_seed_geometry(title: str, qwen3_0_6b_on_meta: torch.nn.Module) -> None:
    make, hypers, expected = SEED_COUNTS[title]
    cfg = make(**hypers)
    variant = Variant.for_config(cfg)
    assert variant.title == title
    targets = find_targets(qwen3_0_6b_on_meta, cfg)
    assert not variant.check(cfg, targets[0].d_in, targets[0].d_out)
    assert sum(variant.num_trainable(cfg, t.d_in, t.d_out) for t in targets) == expected


def test_every_spec_is_in_the_seed_table() -> None:
    ll.import_variants()
    generated = {v.title for v in Variant.registry.values() if v.spec_hash}
    assert generated == set(SEED_COUNTS)


LOKR_MISS_GRALORA = {"LoKr", "MiSS", "MiSS-mini", "GraLoRA"}  # their forwards never read W


def test_quantized_column_is_derived_from_the_specs() -> None:
    quantizable = {title for title, (make, _, _) in SEED_COUNTS.items() if Variant.for_config(make()).quantizable}
    # The seed says yes for LoRA, DeLoRA, IA3-FF, IA3, HRA. EVA is the one difference: its spec reads
    # neither W in the forward nor a residual, so it can run on a quantized base.
    seed = {"LoRA", "DeLoRA", "IA3-FF", "IA3", "HRA", "EVA"}
    # Issue 13's: all but RSDoRA and HiRA, whose forwards read W (PEFT's quantized LoRA refuses DoRA too).
    issue13 = {"RSLoRA", "LoRA-FA", "VeRA", "LoHa", "AdaLoRA", "BEFT", "RoAd", "RoAd-2", "RoAd-4", "TinyLoRA"}
    issue13 |= {"PSOFT", "DEFT", "OFT", "OFT-Cayley", "C3A", "FourierFT", "WaveFT", "VB-LoRA", "PVeRA", "RandLoRA"}
    issue13 |= {"SHiRA"}
    assert quantizable == seed | issue13 | LOKR_MISS_GRALORA


def test_calibration_accepts_dicts_tuples_and_tensors(token_ids: torch.Tensor) -> None:
    model = tiny_qwen()
    targets = find_targets(model, ll.EVAConfig())
    runs = [
        calibrate(model, targets, {"C": "cov"}, batches, "EVA")
        for batches in ([{"input_ids": token_ids}], [(token_ids,)], [token_ids])
    ]
    for name in runs[0]:
        assert torch.allclose(runs[0][name]["C"], runs[1][name]["C"])
        assert torch.allclose(runs[0][name]["C"], runs[2][name]["C"])


def test_calibration_statistic_is_the_second_moment_of_the_inputs() -> None:
    model = tiny_mlp()
    targets = find_targets(model, ll.EVAConfig(target_names="up"))
    batches = [torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = calibrate(model, targets, {"C": "cov", "m": "mean"}, batches, "EVA")["up"]
    rows = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert torch.allclose(stats["C"].double(), rows.T @ rows / rows.shape[0], atol=1e-6)
    assert torch.allclose(stats["m"].double(), rows.mean(0), atol=1e-6)


def test_calibration_leaves_out_padding() -> None:
    """A right-padded batch with its attention_mask gives the statistics of the unpadded sequences."""
    model = tiny_qwen()
    targets = find_targets(model, ll.EVAConfig())
    gen = torch.Generator().manual_seed(5)
    short, long = torch.randint(1, 96, (1, 5), generator=gen), torch.randint(1, 96, (1, 8), generator=gen)
    padded = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    masked = calibrate(model, targets, {"C": "cov"}, [{"input_ids": padded, "attention_mask": mask}], "EVA")
    separate = calibrate(model, targets, {"C": "cov"}, [short, long], "EVA")
    unmasked = calibrate(model, targets, {"C": "cov"}, [padded], "EVA")
    for name in masked:
        assert torch.allclose(masked[name]["C"], separate[name]["C"], atol=1e-5, rtol=1e-4), name
        assert not torch.allclose(unmasked[name]["C"], separate[name]["C"], atol=1e-5, rtol=1e-4), name


def _peak_rss_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def test_calibration_memory_does_not_grow_with_tokens() -> None:
    """10x more calibration tokens, same peak memory: statistics stream, activations are not kept."""
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    targets = find_targets(model, ll.EVAConfig(target_names=None))

    def batches(n: int):
        for i in range(n):
            yield torch.randn(4096, 512, generator=torch.Generator().manual_seed(i))  # 8 MiB per batch

    peaks = []
    for n in (4, 40):
        _reset_peak_rss()
        before = _peak_rss_kib()
        calibrate(model, targets, {"C": "cov"}, batches(n), "EVA")
        peaks.append(_peak_rss_kib() - before)
    print(f"peak RSS growth: {peaks[0]} KiB for 4 batches, {peaks[1]} KiB for 40 batches")
    # Keeping the activations would add 2 layers x 36 batches x 8 MiB = 576 MiB for the larger run.
    assert peaks[1] < peaks[0] + 64 * 1024


# ------------------------------------------------------------------ bad input, all before any change


def test_missing_calibration_data_is_a_clear_error() -> None:
    model = tiny_qwen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"EVA initialises from calibration statistics.*calibration_data=batches"):
        ll.attach(model, ll.EVAConfig(r=4))
    assert_unchanged(model, before)


def test_empty_calibration_data_is_a_clear_error() -> None:
    model = tiny_qwen()
    before = snapshot(model)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        ll.attach(model, ll.AntiPaSTOCorDAConfig(r=4), calibration_data=[])
    assert_unchanged(model, before)


def test_calibration_that_never_reaches_a_target_is_a_clear_error() -> None:
    model = tiny_mlp()
    before = snapshot(model)

    wrapper = torch.nn.ModuleDict({"body": model})
    wrapper.forward = lambda x: model.up(x)  # a forward that skips `down`
    with pytest.raises(ValueError, match=r"EVA: the calibration batches never reached body\.down"):
        ll.attach(wrapper, ll.EVAConfig(r=2, target_names=None), calibration_data=[torch.randn(2, 12)])
    assert_unchanged(model, before)


def test_singular_covariance_is_a_clear_error() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    zeros = [torch.zeros(4, 12)]  # every input is 0: C = 0, and with no damping it cannot be inverted
    with pytest.raises(ValueError, match=r"AntiPaSTO-CorDA: init failed on up .*singular.*add damping"):
        ll.attach(model, ll.AntiPaSTOCorDAConfig(r=4, damping=0.0, target_names="up"), calibration_data=zeros)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (ll.HRAConfig(r=3, target_names=None), r"HRA pairs its reflections at init: r must be even"),
        (ll.AntiPaSTOConfig(r=16, target_names=None), r"down \(d_in=20, d_out=8, r=16\): svd\(W, r\) needs r <= min"),
        (ll.AntiPaSTOArrowConfig(r=4, k=6, target_names=None), r"k must be at most r"),
        (
            ll.EVAConfig(r=13, target_names="up"),
            r"up \(d_in=12, d_out=20, r=13, alpha=16.0\): svd\(C, r\) needs r <= d_in",
        ),
    ],
)
def test_impossible_hypers_name_the_variant_layer_and_fix(cfg, message: str) -> None:
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"(?s)cannot attach .*{message}"):
        ll.attach(model, cfg, calibration_data=[torch.randn(2, 12)])
    assert_unchanged(model, before)


def test_lowrank_svd_is_close_to_exact() -> None:
    exact, fast = tiny_qwen(), tiny_qwen()
    ll.attach(exact, ll.AntiPaSTOConfig(r=8))
    ll.attach(fast, ll.AntiPaSTOConfig(r=8, svd_method="lowrank"))
    layer_e, layer_f = (m.model.layers[0].self_attn.q_proj for m in (exact, fast))
    assert torch.allclose(layer_e.lora_S, layer_f.lora_S, rtol=1e-2)
    with pytest.raises(ValueError, match="svd_method must be one of"):
        ll.AntiPaSTOConfig(svd_method="fast")


def test_load_needs_no_calibration_data(tmp_path, token_ids: torch.Tensor) -> None:
    model = tiny_qwen()
    ll.attach(model, ll.AntiPaSTOCorDAConfig(r=8), calibration_data=[token_ids])
    with torch.no_grad():
        out = model(token_ids).logits
    ll.save(model, tmp_path / "corda.safetensors")
    fresh = tiny_qwen()
    ll.load(fresh, tmp_path / "corda.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(token_ids).logits, out)
