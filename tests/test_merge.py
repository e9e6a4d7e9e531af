"""ll.merge and `lora-lite merge`: the compiler derives each variant's merge from its forward rule.

The exactness of every variant's merge, after training moved every adapter tensor off its init, on
layers with and without bias and d_in != d_out, is the shared check `merges exactly`
(lora_lite.verify, run on every row of tests/test_variants.py). Here: half-precision bases, a
forward that is not affine (refused with the compiler's reason, the model left as it was), and the
`lora-lite merge` command, whose checkpoint loads in a process that never imports lora_lite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_qwen, import_spec, tiny_mlp
from torch import nn

import lora_lite as ll
from lora_lite.variant import AdapterConfig, Variant

# Small configs for every variant of specs/ (r must fit the 12-wide MLP layer and the 64-wide Qwen; block sizes b and
# RoAd's group_size must divide its d_in, 12, and d_out, 20; FourierFT's n_frequency must fit 12 * 20).
SMALL = {"r": 4, "k": 2, "b": 4, "group_size": 4, "n_frequency": 16, "num_vectors": 8, "vector_length": 4}


def generated() -> dict[str, type[Variant]]:
    ll.import_variants()
    return {v.title: v for v in Variant.registry.values() if v.spec_hash and v.__module__.startswith("lora_lite.")}


def config(variant: type[Variant], **extra: object) -> AdapterConfig:
    fields = {f.name for f in variant.config_class.hyper_fields()}
    return variant.config_class(**{k: v for k, v in SMALL.items() if k in fields}, **extra)


def models() -> dict[str, tuple[nn.Module, torch.Tensor, dict]]:
    """A Qwen3 whose q/k/v have a bias and o_proj has none (64 -> 128, 128 -> 64), and a 2-layer MLP."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    qwen = {"target_names": r"(q_proj|v_proj|o_proj|down_proj)$"}
    return {"qwen": (build_qwen(bias=True), ids, qwen), "mlp": (tiny_mlp(), x, {"target_names": None})}


def out(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    result = model(inputs)
    return result.logits if hasattr(result, "logits") else result


def calibration(inputs: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    if inputs.dtype == torch.long:
        return [torch.randint(0, VOCAB, inputs.shape, generator=g) for _ in range(2)]
    return [torch.randn(inputs.shape, generator=g) for _ in range(2)]


def train_off_init(model: nn.Module, inputs: torch.Tensor) -> None:
    """Nudge every adapter tensor off its init (zeros stay zeros under some gradients), then 3 AdamW steps."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(3):
        out(model, inputs).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p.detach(), init[n]) for n, p in params.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("title", sorted(generated()))
def test_merge_on_a_half_precision_base_is_computed_in_float32_and_cast_once(title: str, dtype: torch.dtype) -> None:
    variant = generated()[title]
    model, inputs, _ = models()["mlp"]
    extra = {"target_names": ["up"]}  # 12 -> 20 with a bias: BEFT adds a bias, which `down` could not hold
    model.to(dtype)
    batches = [b.to(dtype) for b in calibration(inputs)] if variant.stats else None
    ll.attach(model, config(variant, **extra), calibration_data=batches)
    train_off_init(model, inputs.to(dtype))
    with torch.no_grad():
        adapted = out(model, inputs.to(dtype)).float()
        ll.merge(model)
        merged = out(model, inputs.to(dtype)).float()
    assert {p.dtype for p in model.parameters()} == {dtype}
    # README (Merging): a half-precision merge differs from the adapted model by the rounding of one cast.
    assert (merged - adapted).abs().max().item() <= 2e-2 * adapted.abs().max().item()


NOT_AFFINE = '''adapter elu_gate "EluGate"
"""A gate that squashes the layer's input: not affine in x, so it cannot be merged."""
param g[d_in] = zeros
input x + g * elu(x)
'''


def test_a_forward_that_is_not_affine_is_refused_with_the_compilers_reason(tmp_path: Path) -> None:
    module = import_spec(NOT_AFFINE, tmp_path, "elu_gate")
    try:
        variant = module.EluGate
        assert "elu" in variant.merge_refusal and "x" in variant.merge_refusal
        model, inputs, _ = models()["mlp"]
        ll.attach(model, module.EluGateConfig(target_names=None))
        train_off_init(model, inputs)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ll.MergeError, match="EluGate cannot be merged") as info:
            ll.merge(model)
        assert variant.merge_refusal in str(info.value)
        assert ll.attachment(model) is not None
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    finally:
        Variant.registry.pop("elu_gate", None)


def test_merge_without_an_adapter_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.merge(tiny_mlp())


def test_lora_lite_merge_writes_a_checkpoint_that_loads_without_lora_lite(tmp_path: Path) -> None:
    base = build_qwen(bias=True)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    ll.attach(base, ll.DoRAConfig(r=4))
    train_off_init(base, ids)
    ll.save(base, tmp_path / "dora.safetensors")
    with torch.no_grad():
        adapted = out(base, ids)
    torch.save(ids, tmp_path / "ids.pt")
    cli = [sys.executable, "-m", "lora_lite.cli", "merge", str(tmp_path / "dora.safetensors")]
    done = subprocess.run([*cli, "--base", str(tmp_path / "base"), "-o", str(tmp_path / "merged")], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    check = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval(); "
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); "
        "assert not any(k.startswith('lora_lite') for k in sys.modules), 'lora_lite was imported'; "
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    reloaded = torch.load(tmp_path / "logits.pt")
    assert (reloaded - adapted).abs().max().item() <= 1e-5 * adapted.abs().max().item()


def test_lora_lite_merge_exits_2_on_missing_files_and_6_when_the_base_cannot_be_read(tmp_path: Path) -> None:
    merge = [sys.executable, "-m", "lora_lite.cli", "merge"]
    done = subprocess.run(
        [*merge, str(tmp_path / "none.safetensors"), "--base", str(tmp_path), "-o", "x"], capture_output=True
    )
    assert done.returncode == 2 and b"no such file or folder" in done.stderr
    (tmp_path / "a.safetensors").write_bytes(b"not an adapter")
    done = subprocess.run(
        [*merge, str(tmp_path / "a.safetensors"), "--base", str(tmp_path), "-o", "x"], capture_output=True
    )
    assert done.returncode == 6 and done.stderr.startswith(b"lora-lite merge: "), done.stderr.decode()
