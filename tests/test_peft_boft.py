"""BOFT (specs/boft.adapter) against PEFT 0.21's BOFT, and the butterfly operator against PEFT's dense product.

The same tiny model twice: ours attached to one, PEFT's BOFT (`boft_block_size=b`,
`boft_n_butterfly_factor=m`) to the other on the same targets. Our R [m, d_in // b, b, b] is PEFT's boft_R as
it is and our 1 + s_shift [d_out] is PEFT's boft_s [d_out, 1] flattened, so random non-identity values are copied from
ours into PEFT's. Then the outputs and the gradients w.r.t. R and s agree (fp32 within 1e-5 of the scale,
bf16 on the MLP within 2e-2), and the trainable counts are equal: on the MLP's up (12 -> 20, bias) and down
(20 -> 8, no bias; d_in != d_out), on tiny Qwen3's q_proj (64 -> 128, bias) and v_proj, with 3-D inputs, for
several block sizes and factor counts.

PEFT runs more than one butterfly factor only with its CUDA extension fbd_cuda (without it, it warns and sets
boft_n_butterfly_factor to 1, after trying for ~20 s per layer to compile it). On CPU the tests put in its
place, as `peft.tuners.boft.layer._FBD_CUDA`, the same block-diagonal written in torch (`_TorchFBD`, the
kernel's interface: forward [N, D, H, H] -> [N, D*H, D*H], backward the diagonal blocks of the gradient);
with one factor they run PEFT's own CPU path (torch.block_diag), with the compile attempt skipped.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import peft_tensor, run_both, tiny_mlp, within_scale

import lora_lite as ll
from lora_lite import ops

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as boft_layer  # noqa: E402
from peft import BOFTConfig, get_peft_model  # noqa: E402

# (model, b, m, dtype): the MLP's 12 and 20 allow b = 2 with 2 factors; Qwen's 64 up to b * 2^(m-1) = 64.
RUNS = [("mlp", 2, 1, torch.float32), ("mlp", 4, 1, torch.float32), ("mlp", 2, 2, torch.float32)]
RUNS += [("qwen", 16, 1, torch.float32), ("qwen", 4, 3, torch.float32), ("qwen", 8, 2, torch.float32)]
RUNS += [("qwen", 2, 5, torch.float32), ("mlp", 2, 2, torch.bfloat16)]
TOL, BF16_TOL = 1e-5, 2e-2


class _TorchFBD:
    """PEFT's fbd_cuda kernel (peft/tuners/boft/fbd) in torch: the block-diagonal of each of N stacks of D
    [H, H] blocks, and its backward, the diagonal blocks of the gradient."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*stack) for stack in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        h = blocks.shape[-1]
        diagonal = [grad[:, i * h : (i + 1) * h, i * h : (i + 1) * h] for i in range(blocks.shape[1])]
        return [torch.stack(diagonal, dim=1)]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_boft(model: torch.nn.Module, cfg: BOFTConfig, factors: int, monkeypatch: pytest.MonkeyPatch):
    if factors > 1:
        monkeypatch.setattr(boft_layer, "_FBD_CUDA", _TorchFBD())
    else:  # PEFT's CPU path, as on a machine without the CUDA toolchain, without the ~20 s compile attempt
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    return get_peft_model(model, cfg, autocast_adapter_dtype=False)


@pytest.mark.parametrize(
    ("model", "b", "m", "dtype"), RUNS, ids=[f"{md}-b{b}-m{m}-{str(d)[6:]}" for md, b, m, d in RUNS]
)
def test_boft_matches_peft(model: str, b: int, m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    build, targets, make_x = MODELS[model]
    cfg = ll.BOFTConfig(b=b, n_butterfly_factor=m, target_names="(^|\\.)(" + "|".join(targets) + ")$")
    cfg.dtype = dtype
    ours = build().to(dtype)
    peft_cfg = BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=targets)
    theirs = _peft_boft(build().to(dtype), peft_cfg, m, monkeypatch)
    ll.attach(ours, cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for key, value in ll.adapter_state_dict(ours).items():
            layer, slot = key.rsplit(".lora_", 1)
            value.copy_(0.2 * torch.randn(value.shape, generator=gen))
            p = peft_tensor(theirs, layer, "boft_R" if slot == "R" else "boft_s")
            assert p.numel() == value.numel() and p.requires_grad
            if dtype == torch.bfloat16:  # PEFT's Cayley solve has no bf16 CPU kernel: its adapter stays fp32
                p.data = p.data.float()
            p.copy_(value.reshape(p.shape) + (slot == "s_shift"))
            pairs.append((key, value, p))
    assert len(pairs) == 2 * len(targets) * (2 if model == "qwen" else 1)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    out_ours, out_peft = run_both(ours, theirs, make_x(), dtype)
    fwd, _ = within_scale(out_ours, out_peft, tol, "forward")
    worst = max(within_scale(value.grad, p.grad, tol, f"gradient of {key}")[0] for key, value, p in pairs)
    print(f"\n| BOFT ({model}, b={b}, m={m}) | {fwd:.1e} | {worst:.1e} | {dtype} |")


@pytest.mark.parametrize(("d", "b", "m"), [(16, 2, 1), (16, 2, 3), (32, 4, 2), (48, 4, 3), (64, 8, 3), (64, 2, 6)])
def test_butterfly_equals_peft_dense_product(d: int, b: int, m: int) -> None:
    """ops.butterfly(R, h) and its transpose against the dense B_m ... B_1 that PEFT's get_delta_weight
    builds from its own permutation matrices (block_butterfly_perm, perm2mat)."""
    gen = torch.Generator().manual_seed(d + b + m)
    n = d // b
    R = torch.randn(m, n, b, b, generator=gen, dtype=torch.float64)
    perm = boft_layer.BOFTLayer.block_butterfly_perm
    P = [boft_layer.BOFTLayer.perm2mat(None, perm(None, d, n // 2**k, b // 2, m - 1)).double() for k in range(m)]
    dense = torch.eye(d, dtype=torch.float64)
    for k in range(m):
        dense = P[k] @ torch.block_diag(*R[k]) @ P[k].T @ dense
    h = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ops.butterfly(R, h), h @ dense.T)
    torch.testing.assert_close(ops.butterfly(R, h, transpose=True), h @ dense)


def test_butterfly_refuses_blocks_it_cannot_pair() -> None:
    with pytest.raises(ValueError, match="even block size"):
        ops.butterfly(torch.zeros(2, 4, 3, 3), torch.zeros(2, 12))
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.butterfly(torch.zeros(3, 6, 2, 2), torch.zeros(2, 12))


@pytest.mark.parametrize(
    ("b", "m", "why"),
    [(8, 1, "b to divide d_in"), (3, 2, "b must be even"), (2, 3, "must divide d_in")],
)
def test_a_layer_boft_cannot_pair_is_refused_and_the_model_is_unchanged(b: int, m: int, why: str) -> None:
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=why):  # the MLP's d_in are 12 and 20
        ll.attach(model, ll.BOFTConfig(b=b, n_butterfly_factor=m, target_names="(^|\\.)(up|down)$"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(name.startswith("lora_") for name, _ in model.named_buffers())
