"""Parity with PEFT 0.21's SHiRA (specs/shira.adapter) and the `sparse` operator it is written with.

As in test_peft_spectral.py: the same tiny model twice, ours attached to one, PEFT's (its default `random` mask) to
the other on the same targets (`up` 12 -> 20 with bias, `down` 20 -> 8 without: d_in != d_out; 3-D inputs; tiny
Qwen3's q_proj 64 -> 128 and v_proj 64 -> 64 with bias), at several r. PEFT's positions (shira_indices, [2, k]
(row, column) pairs drawn by randperm from its generator) are copied into our idx as flat row-major indices, in
PEFT's order; random non-zero values go on our weight and are copied into PEFT's shira_weight. Then in float32 the
outputs and the gradients w.r.t. every shira_weight agree within 1e-5 of the reference's scale, and the trainable
counts are equal. `pytest -s` prints the parity rows.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import assert_parity, peft_tensor, run_both, tiny_mlp, within_scale

import lora_lite as ll
from lora_lite import ops
from lora_lite.peft_records import copy_to_twin, peft_twin

peft = pytest.importorskip("peft")
from peft import ShiraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
# bf16: PEFT adds its bf16 values to a bf16 copy of W (one rounding per entry of W + S) and runs one bf16 matmul;
# ours keeps W x in bf16 and adds S x, computed in float32 from bf16 values, then rounded. The outputs round in
# other places: a few bf16 ulps (spacing 2^-7 relative) of the output scale. PEFT's value gradient is a gather of
# its bf16 dense weight gradient, ours a float32 sampled product: the same bound.
BF16_TOL = 2e-2
# r per model: k = r (d_in + d_out) must fit the smallest target (down: 20 * 8 = 160 >= 28 r; v_proj: 64 * 64)
RANKS = {"mlp": (1, 5), "qwen": (2, 16)}
RUNS = [("mlp", torch.float32), ("qwen", torch.float32), ("mlp", torch.bfloat16)]


def _peft_positions(module: torch.nn.Module) -> torch.Tensor:
    """PEFT's positions of one layer ([2, k]: rows, columns) as our flat row-major indices [k], in PEFT's order."""
    rows, cols = module.shira_indices["default"].long()
    return rows * module.in_features + cols


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("model", "dtype"), RUNS, ids=["mlp-fp32", "qwen-fp32", "mlp-bf16"])
@pytest.mark.parametrize("which", [0, 1], ids=["r-small", "r-large"])
def test_forward_gradients_and_counts_match_peft(which: int, model: str, dtype: torch.dtype) -> None:
    build, targets, make_x = MODELS[model]
    r = RANKS[model][which]
    regex = "(^|\\.)(" + "|".join(targets) + ")$"
    ours = build().to(dtype)
    theirs = get_peft_model(
        build().to(dtype), ShiraConfig(r=r, target_modules=list(targets), random_seed=r), autocast_adapter_dtype=False
    )
    ll.attach(ours, ll.SHiRAConfig(r=r, target_names=regex, dtype=dtype))
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for adapted in ll.attachment(ours).adapted:
            name = adapted.target.name
            layer, peft_layer = ours.get_submodule(name), theirs.get_submodule(f"base_model.model.{name}")
            layer.lora_idx.copy_(_peft_positions(peft_layer))  # PEFT's positions into ours
            layer.lora_weight.copy_(0.3 * torch.randn(layer.lora_weight.shape, generator=gen))
            p = peft_tensor(theirs, name, "shira_weight")
            assert p.shape == layer.lora_weight.shape and p.requires_grad
            p.copy_(layer.lora_weight)
            pairs.append((name, layer.lora_weight, p))
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    grads = [(name, t.grad, p.grad) for name, t, p in pairs]
    assert_parity(f"SHiRA r={r} ({model})", outputs, grads, tol, dtype, what=f"SHiRA r={r}: ")


def test_copy_to_twin_gives_peft_our_positions_and_values() -> None:
    """The record's path (the bench's PEFT row): peft_twin, then copy_to_twin turns our flat positions, drawn per
    layer from our seed, into PEFT's (row, column) pairs; PEFT then computes our outputs and value gradients."""
    ours = tiny_mlp()
    cfg = ll.SHiRAConfig(r=3, target_names="up|down")
    ll.attach(ours, cfg)
    with torch.no_grad():
        for t in ll.adapter_state_dict(ours).values():
            if t.requires_grad:
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))
    theirs = peft_twin(tiny_mlp(), cfg, ["up", "down"], autocast_adapter_dtype=False)
    pairs = copy_to_twin(ours, theirs)
    assert sorted(key for key, _, _ in pairs) == ["down.lora_idx", "down.lora_weight", "up.lora_idx", "up.lora_weight"]
    out_ours, out_peft = run_both(ours, theirs, MODELS["mlp"][2](), torch.float32)
    within_scale(out_ours, out_peft, TOL, "forward")
    for key, t, p in pairs:
        if p.requires_grad:
            within_scale(t.grad, p.grad, TOL, f"gradient of {key}")


def _dense(v: torch.Tensor, index: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The [m, n] matrix entry by entry, the reference."""
    out = torch.zeros(m, n, dtype=v.dtype)
    for j, i in enumerate(index.tolist()):
        out[i // n, i % n] = v[j]
    return out


@pytest.mark.parametrize(("m", "n", "k"), [(7, 5, 12), (5, 9, 45), (1, 1, 1), (16, 3, 2)])
@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=["2-D", "3-D"])
def test_sparse_is_the_scattered_matrix_and_its_transpose(m: int, n: int, k: int, shape: tuple[int, ...]) -> None:
    """ops.sparse against the dense matrix, both ways round, on 2-D and 3-D rows, indices in random order (an index
    set from randperm, not sorted); gradients w.r.t. v and h by finite differences (float64)."""
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(m * n, generator=gen)[:k]
    v = torch.randn(k, generator=gen, dtype=torch.float64, requires_grad=True)
    for transpose in (False, True):
        h = torch.randn(*shape, m if transpose else n, generator=gen, dtype=torch.float64, requires_grad=True)
        dense = _dense(v.detach(), index, m, n)
        expected = h.detach() @ (dense if transpose else dense.T)
        got = ops.sparse(v, index, m, n, h, transpose)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-12)
        assert torch.autograd.gradcheck(lambda v, h, t=transpose: ops.sparse(v, index, m, n, h, t), (v, h))


def test_sparse_ops_pass_torch_library_opcheck() -> None:
    """The custom ops' fake (meta) implementations, autograd registration and schema agree with the real ones, as
    torch.compile and AOT autograd rely on them."""
    gen = torch.Generator().manual_seed(1)
    index = torch.randperm(35, generator=gen)[:10]
    v = torch.randn(10, generator=gen, requires_grad=True)
    for transpose, width in ((False, 5), (True, 7)):
        h = torch.randn(2, 3, width, generator=gen, requires_grad=True)
        torch.library.opcheck(torch.ops.lora_lite.sparse_matmul.default, (v, index, 7, 5, h, transpose))
    a, b = torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
    torch.library.opcheck(torch.ops.lora_lite.sparse_sampled.default, (index, 7, 5, a, b))


def test_sparse_in_half_precision_runs_in_float32_and_keeps_the_dtype() -> None:
    """Torch's CPU sparse kernels have no bf16/fp16: the product runs in float32 and comes back in h's dtype, with
    gradients in each input's dtype, within bf16 rounding of the float32 result."""
    gen = torch.Generator().manual_seed(2)
    index = torch.randperm(12 * 20, generator=gen)[:40]
    v, h = torch.randn(40, generator=gen), torch.randn(3, 20, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        vh, hh = v.to(dtype).requires_grad_(), h.to(dtype).requires_grad_()
        out = ops.sparse(vh, index, 12, 20, hh)
        out.sum().backward()
        assert out.dtype == vh.grad.dtype == hh.grad.dtype == dtype
        exact = ops.sparse(vh.detach().float(), index, 12, 20, hh.detach().float())
        assert (out.float() - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_sparse_follows_an_index_set_written_in_place() -> None:
    """The CSR structure is cached per index tensor: a load that writes other positions into the same tensor
    (copy_) must be seen by the next forward."""
    gen = torch.Generator().manual_seed(3)
    index = torch.randperm(30, generator=gen)[:8]
    v, h, g = torch.randn(8, generator=gen), torch.randn(4, 6, generator=gen), torch.randn(4, 5, generator=gen)
    for positions in (index.clone(), torch.randperm(30, generator=gen)[:8]):
        index.copy_(positions)  # the first time a no-op: the structures are built from these positions
        dense = _dense(v, positions, 5, 6)
        assert torch.allclose(ops.sparse(v, index, 5, 6, h), h @ dense.T, atol=1e-6)
        assert torch.allclose(ops.sparse(v, index, 5, 6, g, transpose=True), g @ dense, atol=1e-6)


@pytest.mark.parametrize(
    ("index", "words"),
    [([0, 35], "out of range"), ([-1, 3], "out of range"), ([4, 4], "repeats an entry")],
    ids=["too-large", "negative", "repeated"],
)
def test_sparse_refuses_an_index_set_that_is_not_one(index: list[int], words: str) -> None:
    """A file with bad positions gives a clear error, never a wrong product or a crash in the sparse kernel."""
    with pytest.raises(ValueError, match=words):
        ops.sparse(torch.ones(2), torch.tensor(index), 5, 7, torch.randn(3, 7))


def test_attach_refuses_an_r_with_more_entries_than_the_layer() -> None:
    """PEFT raises for r (d_in + d_out) > d_out d_in; attach refuses it before changing the model (down: 20 * 8 =
    160 < 6 * 28)."""
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="SHiRA needs r"):
        ll.attach(model, ll.SHiRAConfig(r=6, target_names="up|down"))
    assert ll.attachment(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
