"""OFT (Cayley-Neumann) and OFT-Cayley (exact) against PEFT 0.21's OFT, and the dims that divide they use.

The same tiny model twice: ours attached to one, PEFT's OFT (`r=0`, `oft_block_size=b`) to the other on the
same targets. Our `q` [d_in // b, b(b-1)/2] is PEFT's `oft_R.weight` as it is (the same packing of each
block's strict upper triangle), so random non-identity values are copied from ours into PEFT's. Then the
outputs and the gradients w.r.t. q agree (fp32 within 1e-5 of the scale, bf16 on the MLP within 2e-2), and
the trainable counts are equal, for several block sizes: on the MLP's up (12 -> 20, bias) and down
(20 -> 8, no bias; d_in != d_out), on tiny Qwen3's q_proj (64 -> 128) and v_proj, with 3-D inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import run_both, tiny_mlp, within_scale

import lora_lite as ll
from lora_lite import ops
from lora_lite.compiler.dims import Dim
from lora_lite.peft_records import peft_tensor

peft = pytest.importorskip("peft")
from peft import OFTConfig, get_peft_model  # noqa: E402

RUNS = [("mlp", 2, torch.float32), ("mlp", 4, torch.float32), ("qwen", 8, torch.float32), ("qwen", 16, torch.float32)]
RUNS += [("mlp", 4, torch.bfloat16)]
TOL, BF16_TOL = 1e-5, 2e-2


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("exact", [False, True], ids=["neumann", "exact"])
@pytest.mark.parametrize(("model", "b", "dtype"), RUNS, ids=[f"{m}-b{b}-{str(d)[6:]}" for m, b, d in RUNS])
def test_oft_matches_peft(model: str, b: int, dtype: torch.dtype, exact: bool) -> None:
    build, targets, make_x = MODELS[model]
    regex = "(^|\\.)(" + "|".join(targets) + ")$"
    cfg = ll.OFTCayleyConfig(b=b, target_names=regex) if exact else ll.OFTConfig(b=b, target_names=regex)
    cfg.dtype = dtype
    ours = build().to(dtype)
    peft_cfg = OFTConfig(r=0, oft_block_size=b, target_modules=targets, use_cayley_neumann=not exact)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for key, q in ll.adapter_state_dict(ours).items():
            q.copy_(0.2 * torch.randn(q.shape, generator=gen))
            p = peft_tensor(theirs, key.rsplit(".lora_", 1)[0], "oft_R.weight")
            assert p.shape == q.shape and p.requires_grad
            p.copy_(q)
            pairs.append((key, q, p))
    assert len(pairs) == len(targets) * (2 if model == "qwen" else 1)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    out_ours, out_peft = run_both(ours, theirs, make_x(), dtype)
    fwd, _ = within_scale(out_ours, out_peft, tol, "forward")
    worst = max(within_scale(q.grad, p.grad, tol, f"gradient of {key}")[0] for key, q, p in pairs)
    name = "OFT-Cayley" if exact else "OFT"
    print(f"\n| {name} ({model}, b={b}) | {fwd:.1e} | {worst:.1e} | {dtype} |")


def test_a_block_size_that_does_not_divide_d_in_is_refused_and_the_model_is_unchanged() -> None:
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="b to divide d_in"):
        ll.attach(model, ll.OFTConfig(b=8, target_names="(^|\\.)(up|down)$"))  # 12 and 20 are not multiples of 8
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(name.startswith("lora_") for name, _ in model.named_buffers())


def test_quotients_normalise_and_print_as_exact_divisions() -> None:
    d_in, b, r = Dim.of("d_in"), Dim.of("b"), Dim.of("r")
    blocks = d_in // b
    assert blocks * b == d_in  # exact by the per-layer check d_in % b == 0
    assert (Dim.const(2) * r * d_in) // r == Dim.const(2) * d_in  # divides term by term: no quotient
    packed = (b * b - b) // Dim.const(2)
    assert packed * Dim.const(2) == b * b - b and packed.quotients() == {"((b*b - b)//2)"}
    assert blocks.code({"d_in": "d_in", "b": "cfg.b"}) == "(d_in // cfg.b)"
    assert blocks.estimate({"d_in": 4096, "b": 32}) == 128


def test_structured_operators_equal_their_dense_matrices() -> None:
    """blockdiag, kron and their transposes, applied to rows, against the dense matrices they never build."""
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    dense = torch.block_diag(*R)
    torch.testing.assert_close(ops.blockdiag(R, h), h @ dense.T)
    torch.testing.assert_close(ops.blockdiag(R, h, transpose=True), h @ dense)
    A = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    dense = torch.kron(A, B)  # [10, 12]
    torch.testing.assert_close(ops.kron(A, B, h), h @ dense.T)
    g = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ops.kron(A, B, g, transpose=True), g @ dense)
    Q = ops.skew(torch.randn(3, 6, generator=gen, dtype=torch.float64), 4)
    torch.testing.assert_close(Q, -Q.transpose(-2, -1))
    eye = torch.eye(4, dtype=torch.float64)
    R = ops.cayley(Q)
    torch.testing.assert_close(R @ R.transpose(-2, -1), eye.expand_as(R))  # orthogonal
    torch.testing.assert_close(R, (eye + Q) @ torch.linalg.inv(eye - Q))
    small = 1e-3 * Q
    torch.testing.assert_close(ops.cayley_neumann(small, 8), ops.cayley(small), atol=1e-15, rtol=0)
