"""Half precision and autocast, for every registered variant on the tiny Qwen3.

- Under `torch.autocast("cpu", dtype=bf16 | fp16)` (float32 model and adapter), forward and backward give finite
  outputs and gradients, at init and off it (HRA's triangular solve once failed there: autocast turned its Gram
  matmul into bf16, and solve_triangular has no bf16 kernel).
- A bf16 or fp16 adapter on a model of the same dtype is the identity at init (up to that dtype's rounding of the
  residual variants' W - U S Vt), with finite outputs and gradients (DeLoRA's clamped norm scale once overflowed
  fp16: inf * 0 = NaN at init).
"""

from __future__ import annotations

import pytest
import torch
from test_variants import CASES, attach, setup, trainable

import lora_lite as ll
from lora_lite import verify
from lora_lite.variant import Variant

QWEN_CASES = sorted(case for case in CASES if case.endswith("-qwen"))
HALF = [torch.bfloat16, torch.float16]


def test_every_registered_variant_has_a_case() -> None:
    ll.import_variants()
    compiled = {v for v in Variant.registry.values() if v.spec_hash}
    covered = {Variant.for_config(setup(case)[1]) for case in QWEN_CASES}
    assert compiled <= covered, sorted(v.title for v in compiled - covered)


def off_identity(model: torch.nn.Module) -> None:
    """Move every trainable tensor off its init (zero factors too), so that every term of the forward counts."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in trainable(model).values():
            param.add_((0.05 * torch.rand(param.shape, generator=g)).to(param.dtype))


def assert_finite_step(m, where: str) -> None:
    """One loss and backward in train mode, as training runs (PVeRA's log-variance has a gradient only there)."""
    with verify.train_mode(m.module):
        loss = m.loss()
    assert torch.isfinite(loss), f"{where}: loss {loss.item()}"
    loss.backward()
    for name, param in trainable(m.module).items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"{where}: grad of {name}"
    m.module.zero_grad()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", QWEN_CASES)
def test_autocast_forward_and_backward_are_finite(case: str, dtype: torch.dtype) -> None:
    m, cfg = setup(case)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        base = m.out().float()
    attach(m, cfg)
    with torch.autocast("cpu", dtype=dtype):
        with torch.no_grad():
            adapted = m.out().float()
        assert torch.isfinite(adapted).all()
        if Variant.for_config(cfg).identity_at_init:  # (VB-LoRA's docstring says it is not)
            assert (adapted - base).abs().max() <= 0.05 * base.abs().max(), "not the identity at init under autocast"
        assert_finite_step(m, f"{case} under autocast {dtype} at init")
        off_identity(m.module)
        assert_finite_step(m, f"{case} under autocast {dtype} off init")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", QWEN_CASES)
def test_half_adapter_on_half_model(case: str, dtype: torch.dtype) -> None:
    m, cfg = setup(case, dtype=dtype)
    m.module.to(dtype)
    with torch.no_grad():
        base = m.out().float()
    attach(m, cfg)
    assert all(p.dtype == dtype for p in trainable(m.module).values())
    with torch.no_grad():
        adapted = m.out().float()
    assert torch.isfinite(adapted).all()
    if not Variant.for_config(cfg).identity_at_init:  # VB-LoRA: its docstring says it is not
        assert not torch.equal(adapted, base)
    elif Variant.for_config(cfg).has_residual:  # W - U S Vt and U S Vt, each rounded to the model's dtype
        assert (adapted - base).abs().max() <= 0.05 * base.abs().max()
    else:
        assert torch.equal(adapted, base)
    assert_finite_step(m, f"{case} {dtype} at init")
    off_identity(m.module)
    assert_finite_step(m, f"{case} {dtype} off init")
