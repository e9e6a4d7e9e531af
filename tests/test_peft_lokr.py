"""Parity with PEFT 0.21 for LoKr, MiSS, MiSS-mini and GraLoRA, and the language pieces they need: the `kron`,
`fold` and `shuffle` structured operators, rectangular `blockdiag` blocks, and merge of any structured operator
(applied to identity rows in merged(), never in the forward).

As in test_peft_zoo.py: the same tiny model twice, ours attached to one, PEFT's to the other on the same targets
(`up` 12 -> 20 with bias, `down` 20 -> 8 without: d_in != d_out; 3-D inputs; tiny Qwen3's q_proj 64 -> 128 and
v_proj 64 -> 64, with bias). Random non-identity values go on our trainable tensors and are copied into PEFT's
(LoKr's lokr_w2_a is our w2_a0 + w2_a_shift, as specs/lokr.adapter stores it; GraLoRA's blocks are laid out as
specs/gralora.adapter says, a fixed permutation of PEFT's). Then in float32 the outputs and the
gradients w.r.t. every trainable adapter tensor agree within 1e-5 of the reference's scale, the tensors have
PEFT's shapes, and the trainable-parameter counts are equal; bf16 on the MLP within 2e-2 of the scale (a few bf16
ulps: the two sides round in other orders). `pytest -s` prints the parity table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import assert_parity, import_spec, peft_tensor, run_both, tiny_mlp

import lora_lite as ll
from lora_lite import ops
from lora_lite.compiler import builtins as compiler_builtins
from lora_lite.variant import Variant

peft = pytest.importorskip("peft")
from peft import GraloraConfig, LoKrConfig, MissConfig, get_peft_model  # noqa: E402
from peft.tuners.lokr.layer import factorization  # noqa: E402

TOL = 1e-5
BF16_TOL = 2e-2  # as tests/test_peft_parity.py: a few bf16 ulps (spacing 2^-7), the two sides round in other orders
LOKR = {"w1": ("lokr_w1", 0.0), "w2_a_shift": ("lokr_w2_a", "w2_a0"), "w2_b_shift": ("lokr_w2_b", "w2_b0")}
MISS = {"block": ("miss_block", 0.0)}


def _gralora(k: int) -> dict:
    """GraLoRA's layouts: our A [k, r, d_in / k] is PEFT's gralora_A [k, d_in / k, r] with each block transposed;
    our B [k, d_out / k, r] holds the r rows of PEFT's gralora_B [k, r, d_out / k] in (sub-rank, input block)
    order, PEFT's in (input block, sub-rank) order."""

    def b_to_peft(B: torch.Tensor) -> torch.Tensor:
        blocks, out, r = B.shape
        return B.reshape(blocks, out, r // k, k).permute(0, 3, 2, 1).reshape(blocks, r, out)

    return {"A": ("gralora_A", 0.0, lambda A: A.transpose(1, 2)), "B": ("gralora_B", 0.0, b_to_peft)}


# name -> model -> (our config, PEFT config, {our trainable slot: (PEFT key, offset)}). Each LoKr factor f divides
# every target's d_in and d_out and leaves 2 r < max(d_out, d_in) / f (PEFT's low-rank w2); MiSS ranks that divide
# d_in and ones that do not (PEFT zero-pads the last chunk of x).
CASES = {
    "LoKr f=2 r=4": {
        "mlp": (ll.LoKrConfig(r=4, alpha=8, f=2), LoKrConfig(r=4, alpha=8, decompose_factor=2), LOKR),
        "qwen": (ll.LoKrConfig(r=4, alpha=8, f=2), LoKrConfig(r=4, alpha=8, decompose_factor=2), LOKR),
    },
    "LoKr f=4 r=2": {
        "mlp": (ll.LoKrConfig(r=2, alpha=3, f=4), LoKrConfig(r=2, alpha=3, decompose_factor=4), LOKR),
        "qwen": (ll.LoKrConfig(r=4, alpha=3, f=4), LoKrConfig(r=4, alpha=3, decompose_factor=4), LOKR),
    },
    "LoKr f=8 r=2": {"qwen": (ll.LoKrConfig(r=2, f=8), LoKrConfig(r=2, alpha=8, decompose_factor=8), LOKR)},
    "GraLoRA k=2 r=4/8": {
        "mlp": (ll.GraLoRAConfig(r=4, alpha=6, k=2), GraloraConfig(r=4, alpha=6, gralora_k=2), _gralora(2)),
        "qwen": (ll.GraLoRAConfig(r=8, k=2), GraloraConfig(r=8, alpha=64, gralora_k=2), _gralora(2)),
    },
    "GraLoRA k=4 r=8": {
        "mlp": (ll.GraLoRAConfig(r=8, k=4), GraloraConfig(r=8, alpha=64, gralora_k=4), _gralora(4)),
        "qwen": (ll.GraLoRAConfig(r=8, alpha=3, k=4), GraloraConfig(r=8, alpha=3, gralora_k=4), _gralora(4)),
    },
    "MiSS r=4": {
        "mlp": (ll.MiSSConfig(r=4), MissConfig(r=4), MISS),
        "qwen": (ll.MiSSConfig(r=16), MissConfig(r=16), MISS),
    },
    "MiSS r=5/24 (padded)": {  # 12 % 5, 20 % 5 = 0 for down; 64 % 24 != 0
        "mlp": (ll.MiSSConfig(r=5), MissConfig(r=5), MISS),
        "qwen": (ll.MiSSConfig(r=24), MissConfig(r=24), MISS),
    },
    "MiSS-mini r=5/24 mini_r=4/16": {  # the block repeated along d_out (20, 8; 128, 64)
        "mlp": (ll.MiSSMiniConfig(r=5, mini_r=4), MissConfig(r=5, mini_r=4, init_weights="mini"), MISS),
        "qwen": (ll.MiSSMiniConfig(r=24, mini_r=16), MissConfig(r=24, mini_r=16, init_weights="mini"), MISS),
    },
}

# bf16 on the MLP only, as tests/test_peft_zoo.py: through tiny Qwen3's attention the two sides' roundings compound.
RUNS = [(name, model, torch.float32) for name, models in CASES.items() for model in models]
RUNS += [(name, "mlp", torch.bfloat16) for name, models in CASES.items() if "mlp" in models]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "model", "dtype"), RUNS, ids=[f"{n}-{m}-{str(d)[6:]}" for n, m, d in RUNS])
def test_forward_gradients_shapes_and_counts_match_peft(name: str, model: str, dtype: torch.dtype) -> None:
    build, targets, make_x = MODELS[model]
    ours_cfg, peft_cfg, mapping = CASES[name][model]
    ours_cfg = type(ours_cfg)(**{**ours_cfg.to_dict(), "dtype": dtype})
    ours_cfg.target_names = "(^|\\.)(" + "|".join(targets) + ")$"
    peft_cfg.target_modules = list(targets)
    ours = build().to(dtype)
    torch.manual_seed(0)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, ours_cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    state = ll.adapter_state_dict(ours)
    pairs = []
    with torch.no_grad():
        for key, t in state.items():
            layer, slot = key.rsplit(".lora_", 1)
            if slot not in mapping:
                continue
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            peft_key, offset, *layout = mapping[slot]
            layout = layout[0] if layout else lambda v: v  # our tensor in PEFT's layout (a fixed permutation)
            if isinstance(offset, str):
                offset = state[f"{layer}.lora_{offset}"]
            p = peft_tensor(theirs, layer, peft_key)
            assert p.shape == layout(t).shape and p.requires_grad, (key, p.shape, t.shape)  # PEFT's shapes
            p.copy_(layout(t + offset))
            pairs.append((key, t, p, layout))
    assert len(pairs) == len(ll.attachment(ours).adapted) * len(mapping)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    x = make_x()
    outputs = run_both(ours, theirs, x, dtype)
    base = build().to(dtype)(x.to(dtype) if x.is_floating_point() else x)
    base = getattr(base, "logits", base).float()
    out_peft = outputs[1]
    assert (out_peft - base).abs().max().item() > 1e-2 * out_peft.abs().max().item()  # the adapters change it
    grads = [(key, layout(t.grad.float()), p.grad) for key, t, p, layout in pairs]
    assert_parity(f"{name} ({model})", outputs, grads, tol, dtype, what=f"{name}: ")


def test_lokr_factor_is_peft_decompose_factor_and_f_32_is_peft_default_on_1024_and_2048() -> None:
    """specs/lokr.adapter's shape rule: PEFT's factorization(d, f) is (f, d // f) when f divides d; its default
    (decompose_factor=-1, divisors nearest sqrt(d)) is f = 32 on Qwen3-0.6B's 1024 and 2048, not on 3072."""
    for d, f in [(12, 2), (20, 4), (64, 8), (1024, 32), (3072, 32), (2048, 16)]:
        assert factorization(d, f) == (f, d // f)
    assert factorization(1024) == (32, 32) and factorization(2048) == (32, 64)
    assert factorization(3072) == (48, 64)


def test_lokr_refuses_a_factor_that_does_not_divide_or_a_rank_too_high_for_a_low_rank_w2() -> None:
    """Per layer, before attach changes anything: f must divide d_in and d_out, and 2 r < max(d_out, d_in) / f."""
    for cfg, why in [
        (ll.LoKrConfig(r=2, f=3, target_names="up"), "f to divide d_out"),  # 20 % 3
        (ll.LoKrConfig(r=5, f=2, target_names="up"), "needs r <= "),  # 2 * 5 = max(20 // 2, 12 // 2)
    ]:
        model = tiny_mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=why):
            ll.attach(model, cfg)
        assert ll.attachment(model) is None
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("r", "n"), [(4, 12), (5, 12), (8, 20), (3, 3), (7, 5)])
def test_fold_is_the_stacked_identity_matrix_and_its_transpose(r: int, n: int) -> None:
    """fold(r, n) is F = [I_r I_r ... I_r] cut at n columns: F h sums h's chunks (the last zero-padded), F^T v
    repeats v to length n."""
    F = torch.cat([torch.eye(r)] * (-(-n // r)), dim=1)[:, :n]
    h = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 3, r, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ops.fold(r, n, h), h @ F.double().T)
    assert torch.allclose(ops.fold(r, n, v, transpose=True), v @ F.double())


def test_kron_applies_the_kronecker_product_without_building_it() -> None:
    A = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    B = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(2, 6, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(ops.kron(A, B, h), h @ torch.kron(A, B).T)
    assert torch.allclose(ops.kron(A, B, g, transpose=True), g @ torch.kron(A, B))


@pytest.mark.parametrize(("a", "b"), [(2, 3), (4, 4), (1, 5)])
def test_shuffle_is_the_stride_permutation_and_its_transpose_the_inverse(a: int, b: int) -> None:
    h = torch.arange(2 * a * b, dtype=torch.float64).reshape(2, a * b)
    expected = h.reshape(2, a, b).transpose(1, 2).reshape(2, a * b)
    assert torch.equal(ops.shuffle(a, b, h), expected)
    assert torch.equal(ops.shuffle(a, b, expected, transpose=True), h)
    assert torch.equal(ops.shuffle(b, a, expected), h)  # shuffle(a, b).T is shuffle(b, a)


def test_blockdiag_takes_rectangular_blocks() -> None:
    R = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = torch.block_diag(*R)  # [6, 15]
    h = torch.randn(4, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ops.blockdiag(R, h), h @ dense.T)
    assert torch.allclose(ops.blockdiag(R, g, transpose=True), g @ dense)


# One spec per structured operator (builtins.OPERATORS), each used as a matrix once merged: at the output site,
# scaled and summed with another term, and transposed. merged() builds it from identity rows; a new operator
# without an entry here fails test_every_operator_has_a_merge_case.
OPERATOR_SPECS = {
    "kron": """
param A[4, 3] = zeros
param B[d_out // 4, d_in // 3] = zeros
output y + 0.5 * (kron(A, B) @ x) - kron(A.T, B.T).T @ x
""",
    "fold": """
param g[5, d_out] = zeros
param u[4] = zeros
let tiled = fold(4, d_out).T @ (u * (fold(4, d_in) @ x))
output y + g.T @ (fold(5, d_in) @ x) + tiled
""",
    "shuffle": """
param A[3, 4, d_in // 3] = zeros
param B[d_out, 12] = zeros
output y + B @ (shuffle(3, 4) @ (blockdiag(A) @ x)) + B @ (shuffle(4, 3).T @ (blockdiag(A) @ x))
""",
    "householder": """
param U[d_out, 3] = zeros
param B[d_out, d_in] = zeros
output householder(U) @ (y + B @ x)
""",
    "blockdiag": """
param R[d_out // 4, 4, 4] = zeros
param B[d_out, d_in] = zeros
output blockdiag(R).T @ (y + B @ x) + y
""",
    "rotate_half": """
param B[d_out, d_in] = zeros
output y + rotate_half(d_out, 4) @ (B @ x)
""",
    "haar": """
param B[d_out, d_in] = zeros
output y + haar(d_out).T @ (B @ x)
""",
    "blockcirculant": """
param K[d_out // 4, d_in // 4, 4] = zeros
output y + 0.5 * (blockcirculant(K) @ x)
""",
    "butterfly": """
param R[2, d_in // 2, 2, 2] = zeros
param B[d_out, d_in] = zeros
output y + B @ (butterfly(R) @ x)
""",
    "sparse": """
hyper seed: int = 0
frozen idx[30] = randperm(d_out * d_in)
param v[30] = zeros
param B[d_out, d_in] = zeros
output y + sparse(v, idx, d_out, d_in) @ x + 0.5 * (B @ (sparse(v, idx, d_out, d_in).T @ (B @ x)))
""",
}


TARGETS = {"kron": "up", "shuffle": "up"}  # 3 divides up's d_in (12), not down's (20); the others: both layers


def test_every_operator_has_a_merge_case() -> None:
    assert set(OPERATOR_SPECS) == set(compiler_builtins.OPERATORS)


@pytest.mark.parametrize("op", sorted(OPERATOR_SPECS))
def test_merge_builds_any_operator_used_as_a_matrix_from_identity_rows(op: str, tmp_path: Path) -> None:
    """An output-site operator in the merged weight: merged() gives the adapted layer's outputs, on a layer with a
    bias (up, 12 -> 20) and one without (down, 20 -> 8); the forward never builds the operator (one ops call on x),
    merged() builds it from identity rows only where no rows go through it (W's rows or columns)."""
    name = f"merge_{op}"
    source = f'adapter {name} "Merge {op.title()}"\n"""Merge of {op} as a matrix."""\n' + OPERATOR_SPECS[op]
    import_spec(source, tmp_path, name)
    try:
        variant = Variant.registry[name]
        assert variant.merge_refusal is None
        text = (tmp_path / f"{name}.py").read_text()
        forward, merged = text.split("def merged", 1)
        built = compiler_builtins.DENSE_FORM.get(op, op)  # sparse is built by scatter, not from identity rows
        assert "torch.eye" not in forward and f"ops.{built}(" in merged
        model = tiny_mlp()
        ll.attach(model, variant.config_class(target_names=TARGETS.get(op)))
        with torch.no_grad():
            for i, p in enumerate(p for p in model.parameters() if p.requires_grad):
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            adapted = model(x)
            ll.merge(model)
            merged_out = model(x)
        assert ll.attachment(model) is None
        assert (merged_out - adapted).abs().max().item() <= 1e-5 * adapted.abs().max().item()
        assert (adapted - tiny_mlp()(x)).abs().max().item() > 1e-2
    finally:
        Variant.registry.pop(name, None)
