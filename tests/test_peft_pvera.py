"""PVeRA (specs/pvera.adapter) equal to PEFT 0.21's pvera, in eval mode (z = mu) and in train mode (z sampled).

PEFT keeps A_mu over A_logvar as one shared pvera_A [2r, max_d_in] and the two lambdas as one pvera_lambda_d [2r];
ours are two shared tensors and two vectors. The test copies PEFT's shared tensors into ours, puts random
non-identity values on both sides, and compares outputs and the gradients of every trainable tensor: fp32 within
1e-5 of the scale, bf16 (MLP) within BF16_TOL. In train mode both sides draw eps from torch's RNG, one
randn_like per layer in the same order, so seeding it alike before each forward gives the same samples.
Layers: tiny MLP up 12 -> 20 with bias, down 20 -> 8 without; tiny Qwen3 q_proj 64 -> 128, v_proj 64 -> 64 with
bias; 3-D inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS, assert_parity, peft_tensor, run_both
from torch import nn

import lora_lite as ll

peft = pytest.importorskip("peft")
from peft import PveraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
BF16_TOL = 2e-2  # a few bf16 ulps (spacing 2^-7): the two sides round in other orders, as tests/test_peft_shared.py
RUNS = [  # model, dtype, r, train mode
    ("mlp", torch.float32, 4, False),
    ("mlp", torch.float32, 4, True),
    ("qwen", torch.float32, 8, False),
    ("qwen", torch.float32, 4, True),
    ("mlp", torch.bfloat16, 4, True),
]


def _regex(targets: list[str]) -> str:
    return "(^|\\.)(" + "|".join(targets) + ")$"


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _models(model: str, dtype: torch.dtype, r: int) -> tuple[nn.Module, nn.Module, list]:
    """Ours and PEFT's PVeRA on the same base, holding the same values; the (key, ours, PEFT's) trainable pairs."""
    build, targets, _ = PARITY_MODELS[model]
    ours = build().to(dtype)
    theirs = get_peft_model(
        build().to(dtype), PveraConfig(r=r, d_initial=0.1, target_modules=targets), autocast_adapter_dtype=False
    )
    ll.attach(ours, ll.PVeRAConfig(r=r, d_initial=0.1, target_names=_regex(targets), dtype=dtype))
    assert _trainable(ours) == _trainable(theirs) > 0
    state = ll.adapter_state_dict(ours)
    with torch.no_grad():
        A = theirs.base_model.pvera_A["default"]  # [2r, max_d_in]: A_mu over A_logvar
        state["lora_shared.lora_A_mu"].copy_(A[:r])
        state["lora_shared.lora_A_logvar"].copy_(A[r:])
        state["lora_shared.lora_B"].copy_(theirs.base_model.pvera_B["default"])
        gen = torch.Generator().manual_seed(3)
        pairs = []
        for layer in sorted({k.rsplit(".lora_", 1)[0] for k in state if not k.startswith("lora_shared.")}):
            lambda_d = peft_tensor(theirs, layer, "pvera_lambda_d")
            lambda_b = peft_tensor(theirs, layer, "pvera_lambda_b")
            mu, logvar, b = (state[f"{layer}.lora_{s}"] for s in ("mu_shift", "logvar_shift", "lambda_b"))
            for t in (mu, logvar, b):
                t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            lambda_d.copy_(torch.cat([mu, logvar]) + 0.1)
            lambda_b.copy_(b)
            pairs += [(f"{layer}.lambda_b", b, lambda_b), (f"{layer}.lambda_d", (mu, logvar), lambda_d)]
    return ours, theirs, pairs


@pytest.mark.parametrize(("model", "dtype", "r", "training"), RUNS, ids=lambda v: str(v).replace("torch.", ""))
def test_pvera_matches_peft(model: str, dtype: torch.dtype, r: int, training: bool) -> None:
    ours, theirs, pairs = _models(model, dtype, r)
    outputs = run_both(ours, theirs, PARITY_MODELS[model][2](), dtype, training)  # the same eps on both sides
    tol = TOL if dtype == torch.float32 else BF16_TOL
    grads = []
    for key, mine, p in pairs:
        # In eval mode z = mu: logvar's lambda gets no gradient (None) on our side, zeros in PEFT's pvera_lambda_d.
        grad = (
            torch.cat([torch.zeros_like(t) if t.grad is None else t.grad for t in mine])
            if isinstance(mine, tuple)
            else mine.grad
        )
        grads.append((key, grad, p.grad))
    assert_parity(f"PVeRA r={r} {'train' if training else 'eval'} ({model})", outputs, grads, tol, dtype)


def test_train_mode_samples_and_eval_mode_takes_the_mean() -> None:
    """Two train-mode forwards differ (fresh eps each time); eval mode is deterministic and equals merged()."""
    ours, _, _ = _models("mlp", torch.float32, 4)
    x = PARITY_MODELS["mlp"][2]()
    with torch.no_grad():
        ours.train()
        assert not torch.equal(ours(x), ours(x))
        ours.eval()
        mean = ours(x)
        assert torch.equal(mean, ours(x))
        ll.merge(ours)
        assert (ours(x) - mean).abs().max() <= 1e-5 * mean.abs().max()


def test_pvera_trainable_count_is_peft_formula() -> None:
    """d_out + 2 r per layer, the shared A_mu, A_logvar and B not counted: tiny Qwen3 (q 64 -> 128, v 64 -> 64)."""
    build, targets, _ = PARITY_MODELS["qwen"]
    model = build()
    ll.attach(model, ll.PVeRAConfig(r=8))
    theirs = get_peft_model(build(), PveraConfig(r=8, target_modules=targets))
    assert _trainable(model) == _trainable(theirs) == 2 * (128 + 16) + 2 * (64 + 16)
