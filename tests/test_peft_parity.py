"""Parity with Hugging Face PEFT (peft 0.21), the reference implementation.

Forward parity: the same tiny model is built twice; ours is attached to one copy
and PEFT's twin of the method (`peft_records.peft_twin`: the config its record
names) to the other, on the same targets. Random non-zero values are set on our
adapter tensors and copied into PEFT's along the record's `tensors` mapping
(`peft_records.copy_to_twin`: PEFT's IA3 vector is `[d_out, 1]` or `[1, d_in]`,
its DeLoRA lambda is `[1]` and equals our `lambda0 + lam_shift`, its DoRA
magnitude is `lora_magnitude_vector`, our `m0 + m_shift`). Then the outputs and
the gradients w.r.t. every mapped adapter tensor must match:

- float32: max |diff| <= 1e-5 * max |reference| (output, and each gradient);
- bfloat16 (model, inputs and adapter tensors all bf16, PEFT with
  `autocast_adapter_dtype=False`): <= 2e-2 * max |reference|, i.e. a few bf16
  ulps (bf16 has an 8-bit significand, spacing 2^-7 = 7.8e-3 relative): the two
  sides round their intermediate products in different orders.

The model is `tiny_mlp()`: `up` (12 -> 20, with bias) and `down` (20 -> 8, no
bias), both targeted, d_in != d_out, on 3-D inputs [batch, tokens, features];
LoRA and DoRA also run on `tiny_qwen()` (q_proj 64 -> 128 and v_proj 64 -> 64,
with bias).

Known, intended differences from PEFT (each stated where it is tested):

- HRA: PEFT's `apply_GS=True` (Gram-Schmidt) is a different function; we match
  `apply_GS=False`, which forms W H_1 ... H_r, the same as our input-site
  householder product.
- EVA: PEFT computes A with incremental PCA of the *centered* inputs and may
  redistribute ranks across layers (`rho > 1`); we take the top-r eigenvectors of
  the uncentered second moment E[x x^T] with one rank for every layer. They agree
  (up to the sign of each row) with `rho=1` on zero-mean inputs, which is what the
  init test checks.
- CorDA (our AntiPaSTO-CorDA basis): PEFT scales each calibration batch by
  1 / max(x) and averages x^T x per batch, we average x x^T per token; on one
  batch these differ by a scalar, which the damping (relative to the trace) and
  the basis ignore. PEFT's damping is 0.01 * mean(diag C) (doubled until the
  inverse is accurate), ours `damping * tr(C) / d_in` with default 1e-4: the test
  sets damping=0.01. With that, U matches up to sign and the residual W matches.
- The AntiPaSTO-CorDA forward (a gain on the singular values) is not a PEFT
  method; only the CorDA basis is compared.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_both, tiny_mlp, tiny_qwen, within_scale

import lora_lite as ll
from lora_lite.peft_records import copy_to_twin, peft_tensor, peft_twin

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 2e-2
# variant, dtype, max abs diff forward, max abs diff grad, worst diff / max |reference|, tolerance on that ratio
TABLE: list[tuple[str, str, float, float, float, float]] = []


# name -> our config on the targets (a regex); PEFT's config and the tensor mapping are the variant's record's
CASES = {
    "LoRA": lambda regex: ll.LoRAConfig(r=4, alpha=8, target_names=regex),
    "PiSSA": lambda regex: ll.PiSSAConfig(r=4, alpha=8, target_names=regex),
    "DoRA": lambda regex: ll.DoRAConfig(r=4, alpha=8, target_names=regex),
    "DeLoRA": lambda regex: ll.DeLoRAConfig(r=4, lambda0=15.0, target_names=regex),
    "IA3": lambda regex: ll.IA3Config(target_names=regex),
    "IA3-FF": lambda regex: ll.IA3FFConfig(target_names=regex),
    "HRA": lambda regex: ll.HRAConfig(r=4, target_names=regex),
}


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random non-zero values on every trainable adapter tensor (not the identity init)."""
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(model).items():
            if not t.requires_grad:
                continue
            noise = torch.randn(t.shape, generator=gen).to(t.dtype)
            slot = key.rsplit(".lora_", 1)[1]
            if slot == "m_shift":  # DoRA's magnitude m0 + m_shift: around its init, kept positive
                t.copy_(0.3 * noise.abs() * ll.adapter_state_dict(model)[key.replace("m_shift", "m0")])
            elif slot == "g":  # gains: around their init
                t.copy_(1 + 0.5 * noise)
            else:
                t.copy_(0.3 * noise)


def _run_parity(name: str, build, targets: list[str], x_fn, dtype: torch.dtype) -> tuple[float, float]:
    ours_cfg = CASES[name]("|".join(f"(^|\\.){t}$" for t in targets))
    ours_cfg.dtype = dtype
    ours, theirs = build().to(dtype), build().to(dtype)
    ll.attach(ours, ours_cfg)
    theirs = peft_twin(theirs, ours_cfg, targets, autocast_adapter_dtype=False)
    _randomize(ours, torch.Generator().manual_seed(3))
    pairs = copy_to_twin(ours, theirs)  # (our key, ours, PEFT's) for every mapped tensor
    # what trains on one side trains on the other; the frozen ones (DeLoRA's ||W|| columns) are compared as values
    assert pairs and all(t.requires_grad == p.requires_grad for _, t, p in pairs)
    assert all(torch.equal(t.detach().reshape(-1), p.detach().reshape(-1)) for _, t, p in pairs if not t.requires_grad)
    pairs = [(key, t, p) for key, t, p in pairs if t.requires_grad]
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    out_ours, out_peft = run_both(ours, theirs, x_fn(), dtype)
    fwd, scale = within_scale(out_ours, out_peft, tol, f"{name} {dtype}: forward")
    grad, rel = 0.0, fwd / scale
    for key, t, p in pairs:
        diff, g_scale = within_scale(t.grad, p.grad, tol, f"{name} {dtype}: gradient of {key}")
        grad, rel = max(grad, diff), max(rel, diff / g_scale)
    return fwd, grad, rel


def _mlp_x() -> torch.Tensor:
    return torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))


def _qwen_x() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(6))


FORWARD = ["LoRA", "PiSSA", "DoRA", "DeLoRA", "IA3", "IA3-FF", "HRA"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FORWARD)
def test_forward_and_gradients_match_peft(name: str, dtype: torch.dtype) -> None:
    # up: 12 -> 20 with bias; down: 20 -> 8 without; x is [2, 5, 12]
    fwd, grad, rel = _run_parity(name, tiny_mlp, ["up", "down"], _mlp_x, dtype)
    TABLE.append((f"{name} (mlp up+down)", str(dtype).removeprefix("torch."), fwd, grad, rel, _tol(dtype)))


@pytest.mark.parametrize("name", ["LoRA", "DoRA"])
def test_forward_and_gradients_match_peft_on_qwen(name: str) -> None:
    fwd, grad, rel = _run_parity(name, tiny_qwen, ["q_proj", "v_proj"], _qwen_x, torch.float32)
    TABLE.append((f"{name} (qwen q+v)", "float32", fwd, grad, rel, FP32_TOL))


def _tol(dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


def _signs(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per-row sign that aligns `ours` with `theirs` (singular vectors are defined up to sign)."""
    s = torch.sign((ours * theirs).sum(dim=1))
    return torch.where(s == 0, torch.ones_like(s), s)


def test_pissa_init_matches_peft() -> None:
    ours, cfg = tiny_mlp(), ll.PiSSAConfig(r=4, alpha=8, target_names="up|down")
    ll.attach(ours, cfg)
    theirs = peft_twin(tiny_mlp(), cfg, ["up", "down"])  # PEFT LoRA with init_lora_weights="pissa"
    worst = 0.0
    for layer in ("up", "down"):
        mine = ours.get_submodule(layer)
        A_p = peft_tensor(theirs, layer, "lora_A.weight").detach()
        B_p = peft_tensor(theirs, layer, "lora_B.weight").detach()
        W_p = theirs.get_submodule(f"base_model.model.{layer}").base_layer.weight.detach()
        s = _signs(mine.lora_A.detach(), A_p)  # the same SVD on both sides: expected all +1
        scale = W_p.abs().max().item()
        diffs = [
            (mine.lora_A.detach() * s[:, None] - A_p).abs().max().item(),
            (mine.lora_B.detach() * s[None, :] - B_p).abs().max().item(),
            (mine.weight.detach() - W_p).abs().max().item(),  # the residual W - U S Vt
        ]
        assert max(diffs) <= FP32_TOL * max(scale, 1.0), (layer, diffs)
        worst = max(worst, *diffs)
    TABLE.append(("PiSSA init (A, B, residual W)", "float32", worst, float("nan"), worst, FP32_TOL))


def test_eva_init_matches_peft_on_zero_mean_inputs() -> None:
    """EVA's A vs PEFT's EVA components, with rho=1 (no rank redistribution) and zero-mean inputs.

    PEFT centers the inputs (incremental PCA); we use E[x x^T]. The batch is
    [x; -x], whose mean is exactly zero, so both are the top right singular
    vectors of the same matrix. Target `up` reads the model input directly.
    """
    from peft import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    half = torch.randn(1, 40, 12, generator=torch.Generator().manual_seed(7))
    batch = torch.cat([half, -half], dim=1)  # [1, 80, 12], mean 0 over tokens
    ours = tiny_mlp()
    ll.attach(ours, ll.EVAConfig(r=4, alpha=8, target_names="^up$"), calibration_data=[batch])
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["up"],
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=1.0, use_label_mask=False),
    )
    state = get_eva_state_dict(
        tiny_mlp(),
        dataloader=[batch],
        peft_config=cfg,
        forward_fn=lambda model, inputs: model(inputs),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    A_p = state["up"].float()
    A = ours.up.lora_A.detach()
    exact = torch.linalg.svd(batch[0], full_matrices=False).Vh[:4]
    assert (A * _signs(A, exact)[:, None] - exact).abs().max().item() <= 1e-5
    diff = (A * _signs(A, A_p)[:, None] - A_p).abs().max().item()
    # PEFT's incremental PCA runs torch.svd_lowrank (randomized, 4 power iterations), so its
    # components are close to, not equal to, the exact ones (here singular values 11.01 and
    # 10.95 are close, which slows the power iteration): about 1e-3 on this batch.
    assert diff <= 5e-3, diff
    TABLE.append(("EVA init (A, up to sign; rho=1, zero-mean x)", "float32", diff, float("nan"), diff, 5e-3))


def test_corda_basis_matches_peft_ipm() -> None:
    """AntiPaSTO-CorDA's U and residual W vs PEFT's corda (IPM) on one calibration batch.

    PEFT's S and V differ from ours by the scalar its per-batch max normalisation
    puts on the covariance; U and U S Vt (hence the residual) do not.
    """
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    batch = torch.randn(1, 64, 12, generator=torch.Generator().manual_seed(8))  # PEFT's hook wants batch size 1
    ours = tiny_mlp()
    ll.attach(ours, ll.AntiPaSTOCorDAConfig(r=4, damping=0.01, target_names="up|down"), calibration_data=[batch])
    theirs = tiny_mlp()
    cfg = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["up", "down"],
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
    )
    with torch.no_grad():
        preprocess_corda(theirs, cfg, run_model=lambda: theirs(batch))
    U_p = {layer: theirs.get_submodule(layer).eigens.U_WC.clone() for layer in ("up", "down")}
    theirs = get_peft_model(theirs, cfg)
    worst = 0.0
    for layer in ("up", "down"):
        mine = ours.get_submodule(layer)
        U = mine.lora_U.detach()
        u_diff = (U * _signs(U.T, U_p[layer].T)[None, :] - U_p[layer]).abs().max().item()
        W_p = theirs.get_submodule(f"base_model.model.{layer}").base_layer.weight.detach()
        w_diff = (mine.weight.detach() - W_p).abs().max().item()
        assert u_diff <= 1e-4, (layer, u_diff)
        assert w_diff <= 1e-4 * W_p.abs().max().item(), (layer, w_diff)
        worst = max(worst, u_diff, w_diff)
    TABLE.append(("CorDA init (U up to sign, residual W)", "float32", worst, float("nan"), worst, 1e-4))


def test_print_parity_table() -> None:
    """Prints the table (run with -s); collected last in this module, so it sees every row above.

    Forward rows: "worst relative" is the largest of the forward and per-tensor gradient
    diffs divided by the reference's max |value|. Init rows: the absolute diff of unit
    singular vectors and O(1) weights, against an absolute tolerance.
    """
    if not TABLE:
        pytest.skip("run the whole module to fill the table")
    lines = [
        "| variant | dtype | max abs diff forward | max abs diff grad | worst relative | tolerance (relative) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for variant, dtype, fwd, grad, rel, tol in TABLE:
        grad_s = "-" if grad != grad else f"{grad:.1e}"
        lines.append(f"| {variant} | {dtype} | {fwd:.1e} | {grad_s} | {rel:.1e} | {tol:.0e} |")
    print("\n" + "\n".join(lines))
