"""RandLoRA (specs/randlora.adapter) equal to PEFT 0.21's randlora.

The same tiny model twice, ours attached to one, PEFT's twin (the record's RandLoraConfig, `peft_twin`) to the other
on the same targets. PEFT's shared randlora_A [r, 1, min] and randlora_B [max, n_max, r] go into ours (the same
shapes: both are sized by the largest d_in and d_out over the targets), and random non-identity lambda and gamma go
from ours into PEFT's (`copy_to_twin`; PEFT's randlora_gamma is our gamma0 + gamma_shift). Targets cover the spec's
conditional both ways and its edge: the MLP's `up` 12 -> 20 (bias; d_in < d_out) and `down` 20 -> 8 (no bias; d_in >
d_out, where U_A and U_B swap sides); tiny Qwen3's q_proj 64 -> 128 and v_proj 64 -> 64 (d_in == d_out), o_proj 128
-> 64 (bias) and down_proj 96 -> 64 (no bias); 3-D inputs. The ranks include ones that do not divide min(d_in,
d_out) (3 on the MLP's down, 8 % 3; 5 on Qwen3, 64 % 5), where the number of bases ceil(min / r) rounds up. In
float32 the output and the gradients with respect to every lambda and gamma agree within 1e-5 of the reference's
scale, in bf16 on the MLP within BF16_TOL; trainable counts are PEFT's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS, assert_parity, run_both, tiny_mlp, tiny_qwen
from torch import nn

import lora_lite as ll
from lora_lite.peft_records import copy_to_twin, peft_twin

peft = pytest.importorskip("peft")

TOL = 1e-5
# bf16 on the MLP, as tests/test_peft_zoo.py: a few bf16 ulps (spacing 2^-7); the two sides round in other orders
# (PEFT's U_A is one autograd Function whose backward is two einsums; ours is two broadcasts under autograd).
BF16_TOL = 2e-2

MODELS = {  # model -> (build, its targets, an input)
    "mlp": PARITY_MODELS["mlp"],
    "qwen": (tiny_qwen, ["q_proj", "v_proj", "o_proj", "down_proj"], PARITY_MODELS["qwen"][2]),
}
RUNS = [  # model, dtype, r, alpha
    ("mlp", torch.float32, 3, 6.0),
    ("mlp", torch.float32, 4, 16.0),
    ("qwen", torch.float32, 8, 16.0),
    ("qwen", torch.float32, 5, 30.0),
    ("mlp", torch.bfloat16, 3, 6.0),
]


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("model", "dtype", "r", "alpha"), RUNS, ids=["mlp-r3", "mlp-r4", "qwen-r8", "qwen-r5", "mlp-bf16-r3"]
)
def test_randlora_matches_peft(model: str, dtype: torch.dtype, r: int, alpha: float) -> None:
    build, targets, make_x = MODELS[model]
    cfg = ll.RandLoRAConfig(r=r, alpha=alpha, target_names="(^|\\.)(" + "|".join(targets) + ")$", dtype=dtype)
    ours = build().to(dtype)
    theirs = peft_twin(build().to(dtype), cfg, targets, autocast_adapter_dtype=False)
    ll.attach(ours, cfg)
    adapted = ll.attachment(ours).adapted
    assert {a.target.d_in < a.target.d_out for a in adapted} == {True, False}  # both forms of the conditional
    # r = 3 and 5 leave a remainder somewhere, so ceil(min / r) rounds up; 4 and 8 divide every min(d_in, d_out)
    assert any(min(a.target.d_in, a.target.d_out) % r for a in adapted) == (r in (3, 5))
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            if t.requires_grad:  # lambda and gamma, away from PEFT's init (lambda = 0 is the identity)
                t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if key.endswith("lam") else 0.05))
    pairs = copy_to_twin(ours, theirs)  # PEFT's shared A and B into ours, our lambda and gamma into PEFT's
    assert {key for key, _, _ in pairs} >= {"lora_shared.lora_A", "lora_shared.lora_B"}
    pairs = [(key, t, p) for key, t, p in pairs if t.requires_grad]
    assert len(pairs) == 2 * len(adapted)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    assert_parity(f"RandLoRA r={r} ({model})", outputs, [(key, t.grad, p.grad) for key, t, p in pairs], tol, dtype)


def test_trainable_count_is_peft_formula() -> None:
    """r n + n min(d_in, d_out) per layer, n = ceil(min(d_in, d_out) / r); the shared A and B and the frozen
    scalar gamma0 not counted."""
    model = tiny_mlp()
    ll.attach(model, ll.RandLoRAConfig(r=3, target_names="up|down"))
    # up 12 -> 20: n = 4; down 20 -> 8: n = ceil(8 / 3) = 3
    assert _trainable(model) == (3 * 4 + 4 * 12) + (3 * 3 + 3 * 8)
    shared = ll.attachment(model).shared
    assert shared.lora_A.shape == (3, 1, 20) and shared.lora_B.shape == (20, 7, 3)  # PEFT's _find_dim: 20 x 20


def test_merge_takes_each_layers_form() -> None:
    """merged() picks the same form per layer as the hook: the merged model computes the adapted one."""
    model = tiny_mlp()
    ll.attach(model, ll.RandLoRAConfig(r=3, target_names="up|down"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ll.adapter_state_dict(model).values():
            if t.requires_grad:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    x = torch.randn(2, 5, 12, generator=gen)
    want = model(x)
    ll.merge(model)
    assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
