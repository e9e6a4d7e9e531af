"""Adapters on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, loaded by transformers from a saved tiny Qwen3.

Every variant whose spec allows a quantized base trains on each (loss goes down) and
round-trips through save/load with identical logits; the others refuse before the model
changes. The CPU trap (bitsandbytes repacks 4-bit weights into an inference-only layout
on an eval forward without gradients) must never reach a gradient.

`pytest -s tests/test_quantized.py -k trains` prints the loss table the README quotes.
"""

from __future__ import annotations

import copy
import functools
import warnings

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from conftest import VOCAB, build_qwen
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lora_lite as ll
from lora_lite.quantized import REPACK_FLAG, dense_weight, hold_trainable_layout, repacked_layers
from lora_lite.variant import Variant

BASES = ("nf4", "fp4", "int8")
STEPS = 6


def bitsandbytes_repacks_on_this_cpu() -> bool:
    """bitsandbytes' own gate for its CPU inference repack, read from a fresh layer.

    `Linear4bit.__init__` sets `support_avx512bf16_for_cpu` from `bitsandbytes.functional.has_avx512bf16()`,
    a call into its native library; the forward repacks only when it is true.
    """
    return bool(getattr(bnb.nn.Linear4bit(64, 64), REPACK_FLAG, False))


needs_cpu_repack = pytest.mark.skipif(
    not bitsandbytes_repacks_on_this_cpu(),
    reason="needs AVX512-BF16: bitsandbytes repacks 4-bit weights for CPU inference only where "
    "bitsandbytes.functional.has_avx512bf16() is true, and it is false on this CPU",
)

# Every variant the compiler derives as quantizable, with a small config and a learning rate.
CASES = {
    "LoRA": (lambda: ll.LoRAConfig(r=4), 1e-2),
    "DeLoRA": (lambda: ll.DeLoRAConfig(r=4), 1e-2),
    "IA3": (lambda: ll.IA3Config(), 5e-2),
    "IA3-FF": (lambda: ll.IA3FFConfig(), 5e-2),
    "HRA": (lambda: ll.HRAConfig(r=4), 1e-2),
    "EVA": (lambda: ll.EVAConfig(r=4), 1e-2),
    "RSLoRA": (lambda: ll.RSLoRAConfig(r=4), 1e-2),
    "LoRA-FA": (lambda: ll.LoRAFAConfig(r=4), 1e-2),
    "VeRA": (lambda: ll.VeRAConfig(r=8), 5e-2),
    "VB-LoRA": (lambda: ll.VBLoRAConfig(num_vectors=32, vector_length=16), 5e-2),
    "PVeRA": (lambda: ll.PVeRAConfig(r=8), 5e-2),
    "LoHa": (lambda: ll.LoHaConfig(r=4), 1e-2),
    "AdaLoRA": (lambda: ll.AdaLoRAConfig(r=4), 5e-2),
    "BEFT": (lambda: ll.BEFTConfig(), 5e-2),
    "OFT": (lambda: ll.OFTConfig(b=8), 5e-2),
    "OFT-Cayley": (lambda: ll.OFTCayleyConfig(b=8), 5e-2),
    "PSOFT": (lambda: ll.PSOFTConfig(r=8), 5e-2),
    "DEFT": (lambda: ll.DEFTConfig(r=4), 1e-2),
    "RoAd": (lambda: ll.RoAdConfig(), 5e-2),
    "RoAd-2": (lambda: ll.RoAd2Config(), 5e-2),
    "RoAd-4": (lambda: ll.RoAd4Config(), 5e-2),
    "TinyLoRA": (lambda: ll.TinyLoRAConfig(), 5e-2),
    "C3A": (lambda: ll.C3AConfig(b=16), 5e-2),
    "FourierFT": (lambda: ll.FourierFTConfig(n_frequency=200), 5e-3),
    "WaveFT": (lambda: ll.WaveFTConfig(n_frequency=200), 1e-2),
    "LoKr": (lambda: ll.LoKrConfig(r=4), 1e-2),
    "MiSS": (lambda: ll.MiSSConfig(r=16), 1e-2),
    "MiSS-mini": (lambda: ll.MiSSMiniConfig(r=16, mini_r=8), 1e-2),
    "GraLoRA": (lambda: ll.GraLoRAConfig(r=8), 1e-2),
    "RandLoRA": (lambda: ll.RandLoRAConfig(r=8), 1e-3),
    "SHiRA": (lambda: ll.SHiRAConfig(r=4), 1e-2),
}


def _generated() -> dict[str, type[Variant]]:
    ll.import_variants()
    return {v.title: v for v in Variant.registry.values() if v.spec_hash}


def _dense() -> nn.Module:
    """A 2-layer Qwen3 whose every linear has d_in a multiple of bitsandbytes' CPU block size (64)."""
    return build_qwen(intermediate_size=128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("qwen3")
    _dense().save_pretrained(path)
    return str(path)


def bnb_config(base: str, compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    if base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=base, bnb_4bit_compute_dtype=compute_dtype)


@functools.cache
def _loaded(path: str, base: str, compute_dtype: torch.dtype) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(base, compute_dtype), device_map="cpu", dtype=torch.float32
    )


def quantized(path: str, base: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of the saved model as transformers loads it quantized (in eval mode, as from_pretrained)."""
    return copy.deepcopy(_loaded(path, base, compute_dtype))


def batch(seed: int = 2) -> Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: Tensor) -> float:
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def train(model: nn.Module, ids: Tensor, lr: float, steps: int = STEPS) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()


def grads(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cases_cover_every_quantizable_variant() -> None:
    assert set(CASES) == {title for title, v in _generated().items() if v.quantizable}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("title", sorted(CASES))
def test_quantizable_variant_trains_and_round_trips(saved: str, title: str, base: str, tmp_path) -> None:
    make, lr = CASES[title]
    model, ids = quantized(saved, base), batch()
    quantized_layer = model.model.layers[0].self_attn.v_proj
    assert type(quantized_layer).__module__.startswith("bitsandbytes")
    names = ll.attach(model, make(), calibration_data=[ids])
    assert names and all(type(model.get_submodule(n)).__module__.startswith("bitsandbytes") for n in names)
    before = loss_of(model, ids)
    train(model, ids, lr)
    after = loss_of(model, ids)
    print(f"\n| {title} | {base} | {before:.4f} -> {after:.4f} |", end="")
    assert after < before - 1e-3
    assert repacked_layers(model) == []
    ll.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        expected = model(ids).logits
    fresh = quantized(saved, base)
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


@pytest.mark.parametrize("title", sorted(set(_generated()) - set(CASES)))
def test_variant_reading_the_dense_weight_refuses_before_changing_the_model(saved: str, title: str) -> None:
    variant = _generated()[title]
    model, ids = quantized(saved, "nf4"), batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = variant.config_class()
    with pytest.raises(ValueError) as info:
        ll.attach(model, cfg, calibration_data=[ids])
    message = str(info.value)
    assert f"cannot attach {title}" in message and "quantized" in message and "dequantize the base first" in message
    assert "LoRA" in message and "IA3" in message  # names the variants that do run there
    assert ll.attachment(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("base", BASES)
def test_init_reading_w_gets_the_dequantized_weight(saved: str, base: str) -> None:
    model = quantized(saved, base)
    ll.attach(model, ll.DeLoRAConfig(r=4))
    layer = model.model.layers[1].self_attn.q_proj
    if base == "int8":
        W = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    else:
        W = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert W.shape == (layer.out_features, layer.in_features)
    torch.testing.assert_close(layer.lora_w, torch.linalg.vector_norm(W.float(), dim=0), rtol=0, atol=0)
    dense = _dense().model.layers[1].self_attn.q_proj.weight
    # close to the float model's column norms: quantization error only
    torch.testing.assert_close(layer.lora_w, torch.linalg.vector_norm(dense, dim=0), rtol=0.05, atol=0)


def test_dense_weight_of_an_int8_layer_after_its_first_forward(saved: str) -> None:
    model = quantized(saved, "int8")
    layer = model.model.layers[0].mlp.down_proj
    before = dense_weight(layer)
    model(batch())  # moves the row scales from the weight to the layer's state
    assert layer.weight.SCB is None
    torch.testing.assert_close(dense_weight(layer), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("compute_dtype", "adapter_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_adapter_dtype_and_bnb_compute_dtype(saved: str, compute_dtype: torch.dtype, adapter_dtype) -> None:
    model, ids = quantized(saved, "nf4", compute_dtype), batch()
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == compute_dtype
    model.train()  # a no-grad forward in eval mode would repack the 4-bit layers before attach
    with torch.no_grad():
        base = model(ids).logits
    ll.attach(model, ll.LoRAConfig(r=4, dtype=adapter_dtype))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # B = 0: the hook returns the layer's own y
    before = loss_of(model, ids)
    train(model, ids, lr=1e-2)
    assert loss_of(model, ids) < before - 1e-3
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {adapter_dtype}


# ---------------------------------------------------------------------------- the CPU repack trap


@needs_cpu_repack
def test_the_trap_is_real_on_a_bare_linear4bit() -> None:
    """Without lora-lite: after an eval no_grad forward, backward through a Linear4bit is wrong."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) / 8, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    expected, x.grad = x.grad.clone(), None
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    assert layer.weight.quant_state.packing_format_for_cpu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "gemv_4bit: an autograd kernel was not registered"
        layer(x).square().sum().backward()
    assert x.grad is None or not torch.allclose(x.grad, expected)


@pytest.mark.parametrize("base", BASES)
def test_eval_and_generate_then_train_gives_the_gradients_of_a_fresh_model(saved: str, base: str) -> None:
    model, ids = quantized(saved, base), batch()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=".*_proj"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B != 0: gradients flow through every 4-bit layer
    model.train()
    reference = grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(ids)
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert repacked_layers(model) == []
    # 4-bit: an eval forward with grads on a frozen base would repack too. 8-bit has no repack, but in
    # eval mode bitsandbytes runs its int8 inference matmul (inputs quantized too): other numbers, by design.
    for mode in (model.eval, model.train) if base != "int8" else (model.train,):
        mode()
        got = grads(model, ids)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference)
    if base == "int8":
        model.eval()
        got = grads(model, ids)
        diff = max((got[k] - reference[k]).abs().max() for k in reference)
        assert 0 < diff < 0.1 * max(g.abs().max() for g in reference.values())


@needs_cpu_repack
def test_attach_and_load_refuse_a_model_bitsandbytes_has_repacked(saved: str, tmp_path) -> None:
    model, ids = quantized(saved, "nf4"), batch()
    ll.attach(model, ll.IA3Config())
    ll.save(model, tmp_path / "ia3.safetensors")
    ll.detach(model)  # gives the layers back their repack flag
    with torch.no_grad():
        model(ids)  # eval, no grad: bitsandbytes repacks every 4-bit layer
    assert len(repacked_layers(model)) == 14
    # not model.state_dict(): bitsandbytes' _save_to_state_dict converts the layout back (lossily) as it reads
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="inference-only layout") as info:
        ll.attach(model, ll.LoRAConfig(r=4))
    assert "Load the model again and attach before any inference" in str(info.value)
    with pytest.raises(ValueError, match="inference-only layout"):
        ll.load(model, tmp_path / "ia3.safetensors")
    assert ll.attachment(model) is None
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert len(repacked_layers(model)) == 14


@needs_cpu_repack
def test_state_dict_of_a_repacked_model_changes_its_weights(saved: str) -> None:
    """The README's warning: bitsandbytes 0.50.2 converts a repacked layer back on state_dict(), wrongly."""
    model = quantized(saved, "nf4")
    layer = model.model.layers[0].mlp.down_proj
    before = dense_weight(layer)
    assert not layer.weight.quant_state.nested  # transformers' default: no double quantization
    with torch.no_grad():
        model(batch())
    assert layer.weight.quant_state.packing_format_for_cpu
    model.state_dict()
    assert repacked_layers(model) == []
    after = dense_weight(layer)
    assert after.shape == before.shape
    assert (after - before).abs().max() > 0.1 * before.abs().max()  # far beyond bfloat16 rounding of the scales


# On every CPU: the guard reads bitsandbytes' flags, and copes when a CPU or a build lacks them.


def test_attach_and_load_refuse_a_model_marked_repacked_on_any_cpu(saved: str, tmp_path) -> None:
    """The refusal reads the flag the repack sets (`quant_state.packing_format_for_cpu`), whatever the CPU."""
    model = quantized(saved, "nf4")
    ll.attach(model, ll.IA3Config())
    ll.save(model, tmp_path / "ia3.safetensors")
    ll.detach(model)
    marked = [m for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
    assert len(marked) == 14
    for module in marked:
        module.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' repack sets
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="inference-only layout"):
        ll.attach(model, ll.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="inference-only layout"):
        ll.load(model, tmp_path / "ia3.safetensors")
    assert ll.attachment(model) is None
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_guard_works_where_bitsandbytes_does_not_repack(saved: str) -> None:
    """As on a CPU without AVX512-BF16: the gate is off and no quant_state has the repack flag at all."""
    model, ids = quantized(saved, "nf4"), batch()
    layers = [m for m in model.modules() if hasattr(m, REPACK_FLAG)]
    assert len(layers) == 14
    for layer in layers:
        setattr(layer, REPACK_FLAG, False)  # what Linear4bit.__init__ sets where has_avx512bf16() is false
        assert not hasattr(layer.weight.quant_state, "packing_format_for_cpu")  # the guard must not assume it
    assert repacked_layers(model) == []
    ll.attach(model, ll.LoRAConfig(r=4, target_names=".*_proj"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.train()
    reference = grads(model, ids)
    model.eval()
    with torch.no_grad():
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert repacked_layers(model) == []
    got = grads(model, ids)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    ll.detach(model)
    assert all(getattr(layer, REPACK_FLAG) is False for layer in layers)  # detach gives back what it found
    assert hold_trainable_layout(nn.Linear(4, 4)) == []  # a model with no 4-bit layer: nothing held


def test_merge_refuses_a_quantized_base_and_changes_nothing(saved: str) -> None:
    model = quantized(saved, "nf4")
    ll.attach(model, ll.LoRAConfig(r=4))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ll.MergeError, match="quantized \\(bitsandbytes\\) layers .*Load the base in float32"):
        ll.merge(model)
    assert ll.attachment(model) is not None
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
