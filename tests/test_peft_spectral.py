"""Parity with PEFT 0.21 for issue 13's spectral methods: C3A (block-circulant, by FFTs) and FourierFT.

As in test_peft_zoo.py: the same tiny model twice, ours attached to one, PEFT's to the other on the same targets
(`up` 12 -> 20 with bias, `down` 20 -> 8 without: d_in != d_out; 3-D inputs; tiny Qwen3's q_proj 64 -> 128 and
v_proj 64 -> 64 with bias), at several block sizes / frequency counts. Random non-identity values go on our
trainable tensors and are copied into PEFT's; PEFT's fixed random tensors (FourierFT's spectral entry indices,
drawn from its random_loc_seed) are copied into ours. Then in float32 the outputs and the gradients w.r.t. every
trainable adapter tensor agree within 1e-5 of the reference's scale, and the trainable-parameter counts are equal.

PEFT 0.21's C3A runs its forward through an autograd Function (BlockCircularConvolution) whose hand-written backward
gives a wrong gradient w.r.t. the layer input for block sizes above 2 (its kernel gradient is right; gradcheck below).
Where a C3A layer's input gradient reaches another adapted layer (`up` feeds `down`; Qwen3's layer 0 feeds layer 1)
PEFT's own gradients are then wrong, so the main test differentiates PEFT's forward by autograd (PEFT's forward code,
unchanged, with torch's FFT gradients); test_c3a_kernel_gradients_match_peft_own_backward compares against PEFT's
own backward where no input gradient enters (one adapted layer).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import assert_parity, peft_tensor, run_both, tiny_mlp

import lora_lite as ll
from lora_lite import ops

peft = pytest.importorskip("peft")
from peft import C3AConfig, FourierFTConfig, WaveFTConfig, get_peft_model  # noqa: E402
from peft.tuners.c3a import layer as c3a_layer  # noqa: E402
from peft.tuners.c3a.utils import BlockCircularConvolution  # noqa: E402

TOL = 1e-5
# bf16: our adapter tensors are bf16 (cfg.dtype) while PEFT keeps C3A's kernel in float32, and the two sides round
# x and the update in other orders; a few bf16 ulps (spacing 2^-7) of the output and gradient scales.
BF16_TOL = 2e-2
# WaveFT's spectrum gradients in bf16: PEFT builds the update in bf16 through waverec2d's transposed convolutions, ours
# applies the Haar transforms to bf16 rows. Against the float32 gradients (same values) ours were off by 3.4% of the
# gradient scale on `up` and PEFT's by 7.7%; the two differ by up to 11%. The outputs keep BF16_TOL.
BF16_GRAD_TOL = {"WaveFT": 0.15}


def _fourierft_indices(module: torch.nn.Module) -> torch.Tensor:
    """PEFT's spectral entries of one layer ([2, n]: rows, columns) as our flat row-major indices [n]."""
    rows, cols = module.indices["default"]
    return rows * module.in_features + cols


def _waveft_indices(module: torch.nn.Module) -> torch.Tensor:
    """PEFT's wavelet entries of one layer ([2, n] in its layout [[cA, cH], [cV, cD]]) as our flat indices: our
    layout (haar(d_out) S haar(d_in)^T) has the two detail quadrants cH and cV swapped."""
    rows, cols = module.waveft_indices["default"]
    m, n = module.out_features, module.in_features
    upper_right = (rows < m // 2) & (cols >= n // 2)
    lower_left = (rows >= m // 2) & (cols < n // 2)
    rows = torch.where(upper_right, rows + m // 2, torch.where(lower_left, rows - m // 2, rows))
    cols = torch.where(upper_right, cols - n // 2, torch.where(lower_left, cols + n // 2, cols))
    return rows * n + cols


def _cases(targets: list[str]) -> dict:
    """name -> (our config, PEFT config, {our trainable slot: PEFT key}, {our frozen slot: PEFT's value of a layer})."""
    regex = "(^|\\.)(" + "|".join(targets) + ")$"
    mlp = targets == ["up", "down"]
    b_small, b_large = (2, 4) if mlp else (16, 32)
    n_small, n_large = (16, 160) if mlp else (64, 2000)  # at most d_out * d_in of the smallest layer (down: 160)
    c3a = {"K": "c3a_kernel"}
    fourier = {"spectrum": "fourierft_spectrum"}
    return {
        f"C3A b={b_small}": (ll.C3AConfig(b=b_small, target_names=regex), C3AConfig(block_size=b_small), c3a, {}),
        f"C3A b={b_large}": (ll.C3AConfig(b=b_large, target_names=regex), C3AConfig(block_size=b_large), c3a, {}),
        f"FourierFT n={n_small}": (
            ll.FourierFTConfig(n_frequency=n_small, scaling=150.0, target_names=regex),
            FourierFTConfig(n_frequency=n_small, scaling=150.0),
            fourier,
            {"idx": _fourierft_indices},
        ),
        f"FourierFT n={n_large}": (
            ll.FourierFTConfig(n_frequency=n_large, scaling=20.0, target_names=regex),
            FourierFTConfig(n_frequency=n_large, scaling=20.0, random_loc_seed=5),
            fourier,
            {"idx": _fourierft_indices},
        ),
        f"WaveFT n={n_small}": (
            ll.WaveFTConfig(n_frequency=n_small, target_names=regex),
            WaveFTConfig(n_frequency=n_small),
            {"spectrum": "waveft_spectrum"},
            {"idx": _waveft_indices},
        ),
        f"WaveFT n={n_large}": (
            ll.WaveFTConfig(n_frequency=n_large, scaling=3.0, target_names=regex),
            WaveFTConfig(n_frequency=n_large, scaling=3.0, random_loc_seed=5),
            {"spectrum": "waveft_spectrum"},
            {"idx": _waveft_indices},
        ),
    }


RUNS = [("mlp", torch.float32), ("qwen", torch.float32), ("mlp", torch.bfloat16)]
NAMES = ["C3A small", "C3A large", "FourierFT small", "FourierFT large", "WaveFT small", "WaveFT large"]


def _peft_c3a_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """BlockCircularConvolution.forward of PEFT 0.21, line for line, differentiated by autograd."""
    _, n, b = w.shape
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(w))
    x = torch.fft.fft(x).real
    return x.reshape(*x.shape[:-2], -1)


class _AutogradC3A:
    apply = staticmethod(_peft_c3a_forward)


@pytest.fixture
def peft_c3a_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c3a_layer, "BlockCircularConvolution", _AutogradC3A)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("model", "dtype"), RUNS, ids=["mlp-fp32", "qwen-fp32", "mlp-bf16"])
@pytest.mark.parametrize("which", range(len(NAMES)), ids=NAMES)
def test_forward_gradients_and_counts_match_peft(which: int, model: str, dtype: torch.dtype, peft_c3a_autograd) -> None:
    build, targets, make_x = MODELS[model]
    name, (ours_cfg, peft_cfg, mapping, frozen) = list(_cases(targets).items())[which]
    ours_cfg.dtype = dtype
    peft_cfg.target_modules = list(targets)
    ours = build().to(dtype)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, ours_cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            layer, slot = key.rsplit(".lora_", 1)
            if slot in frozen:  # PEFT's fixed random values into ours
                assert not t.requires_grad
                t.copy_(frozen[slot](theirs.get_submodule(f"base_model.model.{layer}")))
                continue
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            p = peft_tensor(theirs, layer, mapping[slot])
            assert p.shape == t.shape and p.requires_grad, (key, p.shape, t.shape)
            p.copy_(t)
            pairs.append((key, t, p))
    assert len(pairs) == len(ll.attachment(ours).adapted) * len(mapping)
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    g_tol = BF16_GRAD_TOL.get(name.split()[0], tol) if dtype == torch.bfloat16 else tol
    grads = [(key, t.grad, p.grad) for key, t, p in pairs]
    assert_parity(f"{name} ({model})", outputs, grads, tol, dtype, grad_tol=g_tol, what=f"{name}: ")


@pytest.mark.parametrize(("m", "n", "b"), [(3, 2, 4), (2, 3, 5), (1, 1, 1), (2, 2, 6)])
def test_blockcirculant_is_the_dense_block_circulant_matrix_and_its_transpose(m: int, n: int, b: int) -> None:
    """ops.blockcirculant against the matrix built entry by entry (C_ij[r, c] = K[i, j, (c - r) mod b]), odd and
    even b, on 3-D rows; transpose=True applies C^T."""
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(m, n, b, generator=gen, dtype=torch.float64)
    r, c = torch.arange(b)[:, None], torch.arange(b)[None, :]
    dense = torch.cat([torch.cat([K[i, j][(c - r) % b] for j in range(n)], dim=1) for i in range(m)], dim=0)
    h = torch.randn(2, 3, n * b, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, m * b, generator=gen, dtype=torch.float64)
    assert torch.allclose(ops.blockcirculant(K.float(), h.float()).double(), h @ dense.T, atol=1e-5)
    assert torch.allclose(ops.blockcirculant(K.float(), g.float(), transpose=True).double(), g @ dense, atol=1e-5)
    assert ops.blockcirculant(K.float(), h.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("b", [2, 4])
def test_c3a_kernel_gradients_match_peft_own_backward(b: int) -> None:
    """One adapted layer (`down`, 20 -> 8): no C3A input gradient enters, so PEFT's own backward is the reference."""
    ours, theirs = tiny_mlp(), get_peft_model(tiny_mlp(), C3AConfig(block_size=b, target_modules=["down"]))
    ll.attach(ours, ll.C3AConfig(b=b, target_names="down"))
    (K,) = ll.adapter_state_dict(ours).values()
    p = peft_tensor(theirs, "down", "c3a_kernel")
    with torch.no_grad():
        K.copy_(torch.randn(K.shape, generator=torch.Generator().manual_seed(1)))
        p.copy_(K)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert (K.grad - p.grad).abs().max().item() <= TOL * p.grad.abs().max().item()


def test_blockcirculant_gradients_are_exact_where_peft_input_gradient_is_not() -> None:
    """gradcheck (float64, finite differences) passes for ops.blockcirculant w.r.t. K and h, both directions; PEFT
    0.21's BlockCircularConvolution passes for its kernel and fails for its input at b = 4."""
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.blockcirculant, (K, h))
    assert torch.autograd.gradcheck(lambda K, g: ops.blockcirculant(K, g, transpose=True), (K, g))
    assert torch.autograd.gradcheck(lambda K: BlockCircularConvolution.apply(h.detach(), K), (K,))
    peft_input = torch.autograd.gradcheck(
        lambda h: BlockCircularConvolution.apply(h, K.detach()), (h,), raise_exception=False
    )
    assert not peft_input  # if a PEFT release fixes it, drop the autograd stand-in above


def test_c3a_merges_into_the_dense_weight_peft_merges() -> None:
    """ll.merge writes W + C(K) / d_in, the weight PEFT's merge_and_unload writes."""
    ours, theirs = tiny_mlp(), get_peft_model(tiny_mlp(), C3AConfig(block_size=4, target_modules=["up", "down"]))
    ll.attach(ours, ll.C3AConfig(b=4, target_names="(^|\\.)(up|down)$"))
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            layer, _ = key.rsplit(".lora_", 1)
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(len(layer))))
            peft_tensor(theirs, layer, "c3a_kernel").copy_(t)
    ll.merge(ours)
    merged = theirs.merge_and_unload()
    for name in ("up", "down"):
        a, b = getattr(ours, name).weight, getattr(merged, name).weight
        assert (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize(("m", "n"), [(5, 6), (6, 5), (4, 7), (8, 8), (1, 4), (3, 1)])
def test_scatter_and_ifft2_follow_their_definitions(m: int, n: int) -> None:
    """scatter puts v[j] at row-major flat position I[j]; ifft2 (computed from the half spectrum, mirrored) is the
    real inverse 2-D DFT written as a sum of cosines (float64 reference), odd and even sizes, and torch's."""
    gen = torch.Generator().manual_seed(0)
    k = min(3, m * n)
    index = torch.randperm(m * n, generator=gen)[:k]
    v = torch.randn(k, generator=gen, dtype=torch.float64)
    S = ops.scatter(v, index, m, n)
    assert S.shape == (m, n) and torch.equal(S.flatten()[index], v) and int((S != 0).sum()) == k
    r, c = torch.arange(m, dtype=torch.float64), torch.arange(n, dtype=torch.float64)
    phase = 2 * torch.pi * (r[:, None, None, None] * r[None, None, :, None] / m + c[None, :, None, None] * c / n)
    expected = (S[None, None] * torch.cos(phase)).sum(dim=(-2, -1)) / (m * n)  # [j, h] <- sum over k, l
    assert torch.allclose(ops.ifft2(S), expected, atol=1e-12)
    dense = torch.randn(m, n, generator=gen, dtype=torch.float64)
    assert torch.allclose(ops.ifft2(dense), torch.fft.ifft2(dense).real, atol=1e-12)
    assert ops.ifft2(S.bfloat16()).dtype == torch.bfloat16


def test_index_sets_are_int64_seeded_per_layer_kept_by_casts_and_saved(tmp_path) -> None:
    """FourierFT's idx: int64 whatever cfg.dtype, distinct entries below d_out * d_in, drawn from the seed, the
    layer and the tensor name only; model.to(dtype) leaves it int64; save/load is exact; a file whose idx is not
    int64 is refused and leaves the model as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    regex = "(^|\\.)(up|down)$"
    first, second, other = tiny_mlp(), tiny_mlp(), tiny_mlp()
    torch.manual_seed(1)
    ll.attach(first, ll.FourierFTConfig(n_frequency=50, dtype=torch.bfloat16, target_names=regex))
    torch.manual_seed(2)
    ll.attach(second, ll.FourierFTConfig(n_frequency=50, dtype=torch.bfloat16, target_names=regex))
    ll.attach(other, ll.FourierFTConfig(n_frequency=50, seed=1, target_names=regex))
    a, b, c = (ll.adapter_state_dict(m) for m in (first, second, other))
    for layer, size in (("up", 12 * 20), ("down", 20 * 8)):
        idx = a[f"{layer}.lora_idx"]
        assert idx.dtype == torch.int64 and not idx.requires_grad
        assert len(set(idx.tolist())) == 50 and 0 <= int(idx.min()) and int(idx.max()) < size
        assert torch.equal(idx, b[f"{layer}.lora_idx"]) and not torch.equal(idx, c[f"{layer}.lora_idx"])
    assert a["up.lora_spectrum"].dtype == torch.bfloat16
    first.to(torch.float16)
    assert first.up.lora_idx.dtype == torch.int64 and first.up.lora_spectrum.dtype == torch.float16
    with torch.no_grad():
        other.up.lora_spectrum.normal_()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    expected = other(x)
    path = tmp_path / "fourierft.safetensors"
    ll.save(other, path)
    fresh = tiny_mlp()
    ll.load(fresh, path)
    assert fresh.up.lora_idx.dtype == torch.int64 and torch.equal(fresh(x), expected)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    tensors["up.lora_idx"] = tensors["up.lora_idx"].float()
    save_file(tensors, str(tmp_path / "float_idx.safetensors"), metadata=metadata)
    target = tiny_mlp()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="up.lora_idx is torch.float32 in the file, not torch.int64"):
        ll.load(target, tmp_path / "float_idx.safetensors")
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("n", [2, 6, 8, 20])
def test_haar_is_the_inverse_haar_matrix_and_waveft_update_is_peft_waverec2d(n: int) -> None:
    """ops.haar against its [n, n] matrix (orthonormal: H^T H = I), both directions on 3-D rows; the update
    haar(m) S' haar(n)^T equals PEFT's waverec2d of S with db1, S' being S with its detail quadrants swapped."""
    from peft.tuners.waveft.waverec2d import waverec2d

    gen = torch.Generator().manual_seed(0)
    r = 2**-0.5
    H = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n // 2):
        H[2 * k, k] = H[2 * k + 1, k] = H[2 * k, n // 2 + k] = r
        H[2 * k + 1, n // 2 + k] = -r
    h = torch.randn(2, 3, n, generator=gen, dtype=torch.float64)
    assert torch.allclose(ops.haar(n, h), h @ H.T) and torch.allclose(ops.haar(n, h, transpose=True), h @ H)
    assert torch.allclose(H.T @ H, torch.eye(n, dtype=torch.float64))
    m = 4
    S = torch.randn(m, n, generator=gen, dtype=torch.float64)
    A, Hd, V, D = S[: m // 2, : n // 2], S[: m // 2, n // 2 :], S[m // 2 :, : n // 2], S[m // 2 :, n // 2 :]
    swapped = torch.cat([torch.cat([A, V], dim=1), torch.cat([Hd, D], dim=1)], dim=0)
    ours = ops.haar(m, ops.haar(n, swapped, transpose=False).T.contiguous()).T  # haar(m) S' haar(n)^T
    theirs = waverec2d((A.float(), (Hd.float(), V.float(), D.float())), "db1").double()
    assert torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="even size"):
        ops.haar(5, torch.zeros(5))
