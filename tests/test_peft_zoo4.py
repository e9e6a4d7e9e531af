"""Parity with PEFT 0.21 for PSOFT, GLoRA, DEFT and PEANuT (issue 13).

As tests/test_peft_zoo.py: the same tiny model twice, ours attached to one, PEFT's (get_peft_model,
autocast_adapter_dtype=False) to the other on the same targets: the MLP's `up` (12 -> 20, bias) and `down`
(20 -> 8, no bias; d_in != d_out) on [2, 5, 12] inputs, tiny Qwen3's q_proj (64 -> 128) and v_proj
(64 -> 64) on token ids. Random non-identity values go on our trainable tensors and into PEFT's, with the
offsets our specs store (PSOFT: vector_b = 1 + b_shift; DEFT: P = P0 + dP and R = relu(P0)^T W / s + dR, P0
being PEFT's initial P copied into ours). Then in float32 the outputs and the gradients w.r.t. every
trainable adapter tensor agree within 1e-5 of the reference's scale, in bfloat16 on the MLP within BF16_TOL,
and the trainable counts are equal.

GLoRA: PEFT's default gives C, D and E only to layers with a bias, which a spec cannot do per layer; our
spec is PEFT's default on layers without a bias (MLP down, Qwen3 without attention bias) and PEFT's
config_C="none", config_D_E="none" on every layer (MLP up and down, Qwen3 with random attention biases).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, run_both, tiny_mlp, tiny_qwen

import lora_lite as ll
from lora_lite.peft_records import peft_tensor

peft = pytest.importorskip("peft")
from peft import DeftConfig, GloraConfig, PeanutConfig, PsoftConfig, get_peft_model  # noqa: E402

TOL = 1e-5
# bf16 on the MLP: a few bf16 ulps (spacing 2^-7) of the scale, as tests/test_peft_zoo.py; the two sides
# round in other orders (PEFT computes DEFT's update and PSOFT's rotation in float32 on CPU, we in bf16).
BF16_TOL = 3e-2


def _mlp_x() -> torch.Tensor:
    return torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(6))


def _qwen_biased() -> torch.nn.Module:
    """Tiny Qwen3 with random (seeded) attention biases: its biases start at zero, which would hide the bias terms."""
    model, gen = tiny_qwen(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# model -> (build, targets, input)
MODELS = {
    "mlp": (tiny_mlp, ["up", "down"], _mlp_x),
    "mlp-up": (tiny_mlp, ["up"], _mlp_x),
    "mlp-down": (tiny_mlp, ["down"], _mlp_x),
    "qwen": (_qwen_biased, ["q_proj", "v_proj"], _ids),
    "qwen-nobias": (lambda: tiny_qwen(bias=False), ["q_proj", "v_proj"], _ids),
}
# our trainable slot -> (PEFT's key, the offset PEFT's value has from ours)
GLORA = {"Ad": ("glora_A.Xd", 0.0), "Au": ("glora_A.Xu", 0.0), "Bd": ("glora_B.Xd", 0.0), "Bu": ("glora_B.Xu", 0.0)}
PSOFT = {"q": ("psoft_R.weight", 0.0), "b_shift": ("psoft_R.vector_b", 1.0), "a_shift": ("psoft_R.vector_a", 1.0)}
PEANUT = {"A": ("peanut_A.weight", 0.0), "B": ("peanut_B.weight", 0.0)}
NO_BIAS_PATHS = {"config_C": "none", "config_D_E": "none"}


def _cases() -> dict:
    """id -> (method, model, our config, PEFT config, {our trainable slot: PEFT key})."""
    return {
        "psoft-mlp-r4": ("psoft", "mlp", ll.PSOFTConfig(r=4, alpha=8), PsoftConfig(r=4, psoft_alpha=8), PSOFT),
        "psoft-mlp-r8": ("psoft", "mlp", ll.PSOFTConfig(r=8), PsoftConfig(r=8), PSOFT),
        "psoft-qwen-r8": ("psoft", "qwen", ll.PSOFTConfig(r=8, alpha=4), PsoftConfig(r=8, psoft_alpha=4), PSOFT),
        "psoft-qwen-r16": ("psoft", "qwen", ll.PSOFTConfig(r=16), PsoftConfig(r=16), PSOFT),
        "glora-mlp-down": ("glora", "mlp-down", ll.GLoRAConfig(r=4), GloraConfig(r=4), GLORA),
        "glora-qwen-nobias": ("glora", "qwen-nobias", ll.GLoRAConfig(r=8), GloraConfig(r=8), GLORA),
        "glora-mlp-none": ("glora", "mlp", ll.GLoRAConfig(r=4), GloraConfig(r=4, **NO_BIAS_PATHS), GLORA),
        "glora-qwen-none": ("glora", "qwen", ll.GLoRAConfig(r=2), GloraConfig(r=2, **NO_BIAS_PATHS), GLORA),
        "deft-mlp-r4": ("deft", "mlp", ll.DEFTConfig(r=4, alpha=8), DeftConfig(r=4, alpha=8), None),
        "deft-mlp-r8": ("deft", "mlp", ll.DEFTConfig(r=8), DeftConfig(r=8), None),
        "deft-qwen-r8": ("deft", "qwen", ll.DEFTConfig(r=8, alpha=2), DeftConfig(r=8, alpha=2), None),
        "peanut-mlp-r4": (
            "peanut",
            "mlp",
            ll.PEANuTConfig(r=4, scaling=0.5),
            PeanutConfig(r=4, scaling=0.5),
            PEANUT,
        ),
        "peanut-qwen-r8": (
            "peanut",
            "qwen",
            ll.PEANuTConfig(r=8),
            PeanutConfig(r=8),
            PEANUT,
        ),
    }


BF16 = ["psoft-mlp-r4", "glora-mlp-down", "glora-mlp-none", "deft-mlp-r4", "peanut-mlp-r4"]
RUNS = [(case, torch.float32) for case in _cases()] + [(case, torch.bfloat16) for case in BF16]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fill(method: str, ours, theirs, cfg, mapping: dict | None, dtype: torch.dtype) -> list:
    """Random non-identity values on both sides; the (key, ours, PEFT's) trainable pairs."""
    gen = torch.Generator().manual_seed(3)
    state = ll.adapter_state_dict(ours)
    pairs = []
    with torch.no_grad():
        if method == "deft":  # PEFT's initial P is our frozen P0; both sides then move by the same offsets
            for key, t in state.items():
                layer, slot = key.rsplit(".lora_", 1)
                P, R = peft_tensor(theirs, layer, "deft_P"), peft_tensor(theirs, layer, "deft_R")
                if slot == "P0":
                    assert not t.requires_grad and t.shape == P.shape
                    t.copy_(P)
                elif slot in ("dP", "dR"):
                    t.copy_((0.3 if slot == "dR" else 0.05) * torch.randn(t.shape, generator=gen))
                    p = P if slot == "dP" else R
                    p.add_(t)
                    pairs.append((key, t, p))
            return pairs
        for key, t in state.items():
            layer, slot = key.rsplit(".lora_", 1)
            if slot not in mapping:
                assert not t.requires_grad, key
                continue
            t.copy_(0.3 * torch.randn(t.shape, generator=gen))
            peft_key, offset = mapping[slot]
            p = peft_tensor(theirs, layer, peft_key)
            assert p.numel() == t.numel() and p.requires_grad, (key, p.shape, t.shape)
            p.copy_((t + offset).reshape(p.shape))
            pairs.append((key, t, p))
    return pairs


@pytest.mark.parametrize(("case", "dtype"), RUNS, ids=[f"{c}-{str(d)[6:]}" for c, d in RUNS])
def test_forward_gradients_and_counts_match_peft(case: str, dtype: torch.dtype) -> None:
    method, model, cfg, peft_cfg, mapping = _cases()[case]
    build, targets, make_x = MODELS[model]
    cfg.target_names = "(^|\\.)(" + "|".join(targets) + ")$"
    cfg.dtype = dtype
    peft_cfg.target_modules = list(targets)
    ours = build().to(dtype)
    torch.manual_seed(0)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    pairs = _fill(method, ours, theirs, cfg, mapping, dtype)
    per_layer = 2 if method == "deft" else len(mapping)
    assert (
        len(pairs)
        == len(ll.attachment(ours).adapted) * per_layer
        == len(targets) * per_layer * (1 + 1 * ("qwen" in model))
    )
    x = make_x()
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, x, dtype)
    grads = [(key, t.grad, p.grad) for key, t, p in pairs]
    assert_parity(f"{case} ({model})", outputs, grads, tol, dtype, what=f"{case}: ")


def test_psoft_buffers_are_pefts_svd_caches() -> None:
    """Our A and s B are PEFT's _psoft_A_cache and scaling * _psoft_B_cache (the same SVD of the same W)."""
    ours, theirs = tiny_qwen(), tiny_qwen()
    ll.attach(ours, ll.PSOFTConfig(r=8, alpha=4, target_names="q_proj"))
    theirs = get_peft_model(theirs, PsoftConfig(r=8, psoft_alpha=4, target_modules=["q_proj"]))
    state = ll.adapter_state_dict(ours)
    layers = [key.rsplit(".lora_", 1)[0] for key in state if key.endswith(".lora_A")]
    assert len(layers) == 2
    for layer in layers:
        module = theirs.get_submodule(f"base_model.model.{layer}")
        A, B = module._psoft_A_cache["default"], module._psoft_B_cache["default"]
        torch.testing.assert_close(state[f"{layer}.lora_A"], A, rtol=0, atol=0)
        torch.testing.assert_close(state[f"{layer}.lora_frozen"], 0.5 * B, rtol=1e-6, atol=1e-7)


def test_deft_refuses_r_above_d_out_and_leaves_the_model() -> None:
    """PEFT caps r at d_out; the spec refuses it with the reason, before changing anything."""
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="DEFT needs r <= d_out"):
        ll.attach(model, ll.DEFTConfig(r=12, target_names="(^|\\.)(up|down)$"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
