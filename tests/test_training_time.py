"""Training-time behaviour in a spec: `dropout(h, p)` acts in train mode only, as PEFT's lora_dropout.

A LoRA spec with `dropout(x, p)` in front of A is PEFT's LoRA with lora_dropout=p: in train mode, with
torch's RNG seeded the same, both draw the same masks (one dropout per layer, in the layers' order), so
outputs and gradients agree; in eval mode dropout is the identity, and `merged()` is the eval-mode layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import import_spec, tiny_mlp

import lora_lite as ll
from lora_lite.peft_records import peft_tensor

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

SPEC = '''adapter lora_dropout_test "LoRA-dropout-test"
"""LoRA with dropout on its input, as PEFT's lora_dropout."""
hyper r: int = 4
hyper alpha: float = 8
hyper p: float = 0.5
let s = alpha / r
param A[r, d_in] = kaiming
param B[d_out, r] = zeros
output y + s * B @ A @ dropout(x, p)
'''
REGEX = "(^|\\\\.)(up|down)$"


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory):
    module = import_spec(SPEC, tmp_path_factory.mktemp("spec"), "lora_dropout_test")
    return module.LoRADropoutTest


def _pair(variant) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    ours = tiny_mlp()
    ll.attach(ours, variant.config_class(target_names=REGEX))
    theirs = get_peft_model(
        tiny_mlp(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["up", "down"]),
        autocast_adapter_dtype=False,
    )
    gen = torch.Generator().manual_seed(1)
    pairs = []
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            layer, slot = key.rsplit(".lora_", 1)
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            p = peft_tensor(theirs, layer, f"lora_{slot}.weight")
            p.copy_(t)
            pairs.append((t, p))
    return ours, theirs, pairs


def test_dropout_in_train_mode_draws_as_peft_lora_dropout(variant) -> None:
    ours, theirs, pairs = _pair(variant)
    ours.train(), theirs.train()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    out_ours = ours(x)
    torch.manual_seed(7)
    out_peft = theirs(x)
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=1e-6)
    out_ours.square().sum().backward()
    out_peft.square().sum().backward()
    for t, p in pairs:
        torch.testing.assert_close(t.grad, p.grad, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.equal(ours(x), out_ours)  # another draw: dropout is really on in train mode


def test_dropout_is_the_identity_in_eval_mode_and_in_the_merged_layer(variant, tmp_path: Path) -> None:
    ours, theirs, _ = _pair(variant)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(expected, theirs(x), rtol=0, atol=1e-6)
        assert torch.equal(ours(x), expected)  # deterministic
        ll.merge(ours)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
