"""The language's per-layer conditional, `A if d_in <= d_out else B`, and min / max / ceil_div of dims, run on the
tiny MLP, whose `up` (12 -> 20) takes the first form and `down` (20 -> 8) the second: the hook computes each
layer's form, and merged() (the output and the input site) merges each layer's own.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import import_spec, tiny_mlp

import lora_lite as ll
from lora_lite.variant import Variant

SPECS = {
    # a rank-r update whose factor on the smaller side has min(d_in, d_out) columns, swapped by the conditional
    "cond_out": """adapter cond_out "CondOut"
hyper r: int = 3
param A[r, min(d_in, d_out)] = kaiming
param B[max(d_in, d_out), ceil_div(min(d_in, d_out), r)] = kaiming
param C[ceil_div(min(d_in, d_out), r), r] = zeros
output y + (B @ C @ A @ x if d_in <= d_out else A.T @ C.T @ B.T @ x)
""",
    "cond_in": """adapter cond_in "CondIn"
hyper r: int = 3
param A[r, d_in] = kaiming
param B[d_in, r] = zeros
input x + (B @ A @ x if d_in <= d_out else 2 * B @ (A @ x))
""",
}


@pytest.fixture(scope="module", autouse=True)
def _own_registry():
    """The variants this file compiles leave the registry when its tests end, so that tests that walk every
    registered variant see the package's only (as tests/test_peft_shared.py)."""
    ll.import_variants()
    saved = dict(Variant.registry)
    yield
    Variant.registry.clear()
    Variant.registry.update(saved)
    for name in SPECS:
        sys.modules.pop(f"lora_lite_test_{name}", None)


def reference(name: str, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if name == "cond_in":
        scale = 1.0 if layer.in_features <= layer.out_features else 2.0
        return torch.nn.functional.linear(x + scale * x @ A.T @ B.T, layer.weight, layer.bias)
    C = layer.lora_C.detach()
    y = torch.nn.functional.linear(x, layer.weight, layer.bias)
    if layer.in_features <= layer.out_features:
        return y + x @ A.T @ C.T @ B.T
    return y + x @ B @ C @ A


@pytest.mark.parametrize("name", list(SPECS))
def test_each_layer_runs_and_merges_its_own_form(name: str, tmp_path) -> None:
    module = import_spec(SPECS[name], tmp_path, name)
    variant = next(v for v in vars(module).values() if isinstance(v, type) and getattr(v, "name", "") == name)
    assert variant.merge_refusal is None
    model = tiny_mlp()
    ll.attach(model, variant.config_class())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in ll.adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    # up: 12 <= 20, the first form; down: 20 > 8, the second; min(20, 8) = 8 is not a multiple of r = 3
    assert model.down.lora_A.shape[-1] == (8 if name == "cond_out" else 20)
    x = torch.randn(2, 5, 12, generator=gen)
    hidden = model.up(x)
    assert torch.allclose(hidden, reference(name, model.up, x), atol=1e-5)
    inner = torch.tanh(hidden)  # TinyMLP: down(tanh(up(x)))
    assert torch.allclose(model.down(inner), reference(name, model.down, inner), atol=1e-5)
    want = model(x)
    want.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in model.parameters() if t.requires_grad)
    ll.merge(model)
    assert torch.allclose(model(x), want, atol=1e-5)
