"""Parity with PEFT 0.21 for issue 13's methods: RSLoRA, RSDoRA, LoRA-FA, LoHa, AdaLoRA (SVD form), HiRA, BEFT
(VeRA, whose A and B are shared by every layer: tests/test_peft_shared.py).

As in test_peft_parity.py: the same tiny model twice, ours attached to one, PEFT's twin (from the variant's
record: `peft_records.peft_twin`) to the other on the same targets (`up` 12 -> 20 with bias, `down` 20 -> 8
without: d_in != d_out; 3-D inputs). Random non-identity values go on our trainable tensors and are copied into
PEFT's along the record's mapping (`peft_records.copy_to_twin`, with the offsets our specs store: LoHa's
hada_w1_a is our w1a0 + w1a_shift), as are our frozen ones (LoRA-FA's A, frozen in PEFT's twin too). Then in
float32 the outputs and the
gradients w.r.t. every trainable adapter tensor agree within 1e-5 of the reference's scale, and the
trainable-parameter counts are equal.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import assert_parity, run_both, tiny_mlp

import lora_lite as ll
from lora_lite.peft_records import RECORDS, copy_to_twin, peft_twin, record_of

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
BF16_TOL = 2e-2  # as tests/test_peft_parity.py: a few bf16 ulps (spacing 2^-7), the two sides round in other orders
REGEX = "(^|\\.)(up|down)$"
# name -> our config on the targets (a regex); PEFT's config and the tensor mapping are the variant's record's
CASES = {
    "RSLoRA": lambda regex: ll.RSLoRAConfig(r=4, alpha=8, target_names=regex),
    "RSDoRA": lambda regex: ll.RSDoRAConfig(r=4, alpha=8, target_names=regex),
    "LoRA-FA": lambda regex: ll.LoRAFAConfig(r=4, alpha=8, target_names=regex),
    "LoHa": lambda regex: ll.LoHaConfig(r=4, alpha=8, target_names=regex),
    "AdaLoRA": lambda regex: ll.AdaLoRAConfig(r=4, alpha=8, target_names=regex),
    "BEFT": lambda regex: ll.BEFTConfig(target_names=regex),
    "HiRA": lambda regex: ll.HiRAConfig(r=4, target_names=regex),
}


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# bf16 on the MLP only, as tests/test_peft_parity.py: through tiny Qwen3's attention and logits the two sides'
# roundings compound past a few ulps (RSDoRA's gradients differ by up to 3% there).
RUNS = [("mlp", torch.float32), ("qwen", torch.float32), ("mlp", torch.bfloat16)]


@pytest.mark.parametrize(("model", "dtype"), RUNS, ids=["mlp-fp32", "qwen-fp32", "mlp-bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_gradients_and_counts_match_peft(name: str, model: str, dtype: torch.dtype) -> None:
    build, targets, make_x = MODELS[model]
    ours_cfg = CASES[name]("(^|\\.)(" + "|".join(targets) + ")$")
    ours_cfg.dtype = dtype
    ours = build().to(dtype)
    torch.manual_seed(0)
    theirs = peft_twin(build().to(dtype), ours_cfg, targets, autocast_adapter_dtype=False)
    ll.attach(ours, ours_cfg)
    mapping = record_of(ours_cfg).tensors
    # PEFT's AdaLoRA leaves its rank counter `ranknum` trainable when the model is bf16 (in fp32 it is not): a
    # PEFT quirk, not a parameter of the method, so it is left out of PEFT's count.
    theirs_count = sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad and "ranknum" not in n)
    assert (
        _trainable(ours)
        == theirs_count
        == _trainable(theirs) - (name == "AdaLoRA" and dtype != torch.float32) * len(ll.attachment(ours).adapted)
    )
    assert theirs_count > 0
    gen = torch.Generator().manual_seed(3)
    state = ll.adapter_state_dict(ours)
    with torch.no_grad():
        for key, t in state.items():
            layer, slot = key.rsplit(".lora_", 1)
            if slot not in mapping or not t.requires_grad:
                continue
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            if slot == "m_shift":  # a DoRA magnitude stays near its init
                t.copy_(0.1 * t.abs() * state[f"{layer}.lora_m0"])
    pairs = copy_to_twin(ours, theirs)  # (our key, ours, PEFT's)
    assert len(pairs) == len(ll.attachment(ours).adapted) * len(mapping)
    # frozen on one side is frozen on the other (LoRA-FA's A); the rest trains on both
    assert all(t.requires_grad == p.requires_grad for _, t, p in pairs)
    pairs = [(key, t, p) for key, t, p in pairs if t.requires_grad]
    assert pairs
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    grads = [(key, t.grad, p.grad) for key, t, p in pairs]
    assert_parity(f"{name} ({model})", outputs, grads, tol, dtype, what=f"{name}: ")


def test_frozen_tensors_are_seeded_per_layer_and_saved(tmp_path) -> None:
    """A frozen random fill depends on the seed, the layer and the tensor only; it is saved and loaded exactly."""
    first, second, other = tiny_mlp(), tiny_mlp(), tiny_mlp()
    torch.manual_seed(1)
    ll.attach(first, ll.LoRAFAConfig(r=4, target_names=REGEX))
    torch.manual_seed(2)  # the global RNG does not matter
    ll.attach(second, ll.LoRAFAConfig(r=4, target_names=REGEX))
    ll.attach(other, ll.LoRAFAConfig(r=4, seed=1, target_names=REGEX))
    a, b, c = (ll.adapter_state_dict(m) for m in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("lora_A"))
    assert not torch.equal(a["up.lora_A"], c["up.lora_A"])  # another seed
    assert not torch.equal(a["up.lora_A"][:, :12], a["down.lora_A"][:, :12])  # another layer
    assert not a["up.lora_A"].requires_grad and "up.lora_A" not in dict(first.named_parameters())
    ll.save(first, tmp_path / "lorafa.safetensors")
    fresh = tiny_mlp()
    ll.load(fresh, tmp_path / "lorafa.safetensors")
    loaded = ll.adapter_state_dict(fresh)
    assert all(torch.equal(a[k], loaded[k]) for k in a)


@pytest.mark.parametrize("name", ["rs_lora", "rsdora"])
def test_import_and_export_round_trip_through_peft(name: str, tmp_path) -> None:
    """PEFT saves an rsLoRA / rsDoRA folder (its twin's flags, random non-identity init); import_peft attaches ours
    with PEFT's outputs; export writes it back."""
    options, title = RECORDS[name].twin.fixed, RECORDS[name].title
    torch.manual_seed(13)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, **options)
    theirs = get_peft_model(tiny_mlp(), cfg)
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if "magnitude" in key:
                p.mul_(1.3)  # off DoRA's identity
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    expected = theirs(x).detach()
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_mlp()
    assert sorted(ll.import_peft(ours, tmp_path / "peft")) == ["down", "up"]
    assert ll.attachment(ours).variant.title == title
    got = ours(x).detach()
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()
    ll.export_peft(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "back")
    again = back(x).detach()
    assert (again - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_lora_fa_exports_as_peft_lora(tmp_path) -> None:
    """LoRA-FA's file is PEFT LoRA's: its frozen A is lora_A; PEFT's model computes what ours does."""
    ours = tiny_mlp()
    ll.attach(ours, ll.LoRAFAConfig(r=4, alpha=8, target_names=REGEX))
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            if key.endswith("lora_B"):
                t.copy_(0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    expected = ours(x).detach()
    ll.export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    got = theirs(x).detach()
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()
