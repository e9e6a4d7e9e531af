"""Parity with PEFT 0.21 for RoAd (road_1, road_2, road_4) and TinyLoRA.

As tests/test_peft_zoo.py: the same tiny model twice, ours attached to one, PEFT's to the other on the same
targets (`up` 12 -> 20 with bias, `down` 20 -> 8 without: d_in != d_out; 3-D inputs; tiny Qwen3's q_proj
64 -> 128 and v_proj 64 -> 64). Random non-identity values go on our trainable tensors and are copied into
PEFT's, laid out as PEFT lays them out (road_4 keeps theta1 and theta2 of a group side by side in one vector;
our RoAd scales are stored as alpha - 1). TinyLoRA's frozen tensors go the other way: its SVD factors are
checked equal to PEFT's, and PEFT's seeded projections are copied into ours. Then in float32 the outputs and
the gradients w.r.t. every trainable adapter tensor agree within 1e-5 of the reference's scale, and the
trainable-parameter counts are equal. `-s` prints `| name (model) | fwd diff | grad diff | dtype |` rows.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY_MODELS as MODELS
from conftest import assert_parity, peft_tensor, run_both

import lora_lite as ll

peft = pytest.importorskip("peft")
from peft import RoadConfig, TinyLoraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
BF16_TOL = 2e-2  # as tests/test_peft_zoo.py: a few bf16 ulps (spacing 2^-7), the two sides round in other orders

# model -> (build, its targets, an input), as tests/test_peft_zoo.py


# name -> (our config class, PEFT variant, {our slot: PEFT key}); _view finds the part of the key that holds it
ROAD = {
    "RoAd": (ll.RoAdConfig, "road_1", {"theta": "road_theta", "alpha_shift": "road_alpha"}),
    "RoAd-2": (ll.RoAd2Config, "road_2", {"theta": "road_theta", "alpha_shift": "road_alpha"}),
    "RoAd-4": (
        ll.RoAd4Config,
        "road_4",
        {"theta1": "road_theta", "theta2": "road_theta", "alpha1_shift": "road_alpha", "alpha2_shift": "road_alpha"},
    ),
}
# (model, dtype, group size): group sizes that divide every target's d_out (MLP 20 and 8; Qwen 128 and 64)
RUNS = [
    ("mlp", torch.float32, 4),
    ("mlp", torch.float32, 2),
    ("qwen", torch.float32, 16),
    ("qwen", torch.float32, 64),
    ("mlp", torch.bfloat16, 4),
]


def _view(peft_value: torch.Tensor, slot: str, group_size: int) -> torch.Tensor:
    """The part of PEFT's tensor that holds our slot (all of it, except for road_4's split slots)."""
    index = slot.removesuffix("_shift")[-1]
    if index in "12":
        return peft_value.reshape(-1, 2, group_size)[:, int(index) - 1, :]
    return peft_value


@pytest.mark.parametrize(("model", "dtype", "group_size"), RUNS, ids=[f"{m}-{str(d)[6:]}-g{g}" for m, d, g in RUNS])
@pytest.mark.parametrize("name", list(ROAD))
def test_road_matches_peft(name: str, model: str, dtype: torch.dtype, group_size: int) -> None:
    build, targets, make_x = MODELS[model]
    config_class, variant, mapping = ROAD[name]
    ours_cfg = config_class(group_size=group_size, target_names="(^|\\.)(" + "|".join(targets) + ")$", dtype=dtype)
    peft_cfg = RoadConfig(variant=variant, group_size=group_size, target_modules=list(targets))
    ours = build().to(dtype)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, ours_cfg)
    assert _trainable(ours) == _trainable(theirs) > 0
    gen = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(ours).items():
            layer, slot = key.rsplit(".lora_", 1)
            # as PEFT's init_weights=False: angles around 0, scales around 1 (ours store alpha - 1)
            t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            p = peft_tensor(theirs, layer, mapping[slot])
            offset = 1.0 if slot.startswith("alpha") else 0.0
            _view(p, slot, group_size).copy_(t.reshape(_view(p, slot, group_size).shape) + offset)
            pairs.append((key, t, p, slot))
    assert len(pairs) == len(ll.attachment(ours).adapted) * len(mapping)
    _compare(ours, theirs, make_x, dtype, pairs, group_size, name, f"{name} g={group_size} ({model})")


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _compare(ours, theirs, make_x, dtype, pairs, group_size, name, label):
    """Forward both, backward a random weighting of the outputs; assert outputs and gradients agree (PEFT's
    gradients viewed in our slots' layout) and print the parity row `label`."""
    tol = TOL if dtype == torch.float32 else BF16_TOL
    outputs = run_both(ours, theirs, make_x(), dtype)
    grads = [(key, t.grad, _view(p.grad, slot, group_size)) for key, t, p, slot in pairs]
    assert_parity(label, outputs, grads, tol, dtype, what=f"{name}: ")


TINY_RUNS = [("mlp", torch.float32, 2, 4), ("mlp", torch.float32, 4, 64), ("qwen", torch.float32, 2, 8)]
TINY_RUNS += [("mlp", torch.bfloat16, 2, 4)]


@pytest.mark.parametrize(
    ("model", "dtype", "r", "u"), TINY_RUNS, ids=[f"{m}-{str(d)[6:]}-r{r}-u{u}" for m, d, r, u in TINY_RUNS]
)
def test_tinylora_matches_peft(model: str, dtype: torch.dtype, r: int, u: int) -> None:
    """Our SVD factors A, B equal PEFT's tinylora_A, tinylora_B; PEFT's seeded projections P [u, r, r] are
    copied into ours ([u*r, r], the same numbers); random v on both sides."""
    build, targets, make_x = MODELS[model]
    ours_cfg = ll.TinyLoRAConfig(r=r, u=u, target_names="(^|\\.)(" + "|".join(targets) + ")$", dtype=dtype)
    peft_cfg = TinyLoraConfig(r=r, u=u, target_modules=list(targets))
    ours = build().to(dtype)
    theirs = get_peft_model(build().to(dtype), peft_cfg, autocast_adapter_dtype=False)
    ll.attach(ours, ours_cfg)
    assert _trainable(ours) == _trainable(theirs) == u * len(ll.attachment(ours).adapted)
    gen = torch.Generator().manual_seed(3)
    state = ll.adapter_state_dict(ours)
    pairs = []
    with torch.no_grad():
        for name in sorted({key.rsplit(".lora_", 1)[0] for key in state}):
            module = theirs.get_submodule(f"base_model.model.{name}")
            for slot in ("A", "B"):  # the same SVD of the same weight
                mine, peft_value = state[f"{name}.lora_{slot}"], getattr(module, f"tinylora_{slot}")["default"]
                close = 1e-4 if dtype == torch.float32 else BF16_TOL  # both round fp32 SVD factors to dtype
                torch.testing.assert_close(mine.float(), peft_value.float(), rtol=close, atol=close)
                mine.copy_(peft_value)  # so that the run below compares the forwards, not two SVD roundings
            state[f"{name}.lora_P"].copy_(module.tinylora_P["default"].reshape(u * r, r))
            v_ours = state[f"{name}.lora_v"]
            v_peft = module.tinylora_v["default"][module._tinylora_v_key["default"]]
            v_ours.copy_(0.3 * torch.randn(v_ours.shape, generator=gen))
            v_peft.copy_(v_ours.reshape(v_peft.shape))
            pairs.append((f"{name}.lora_v", v_ours, v_peft, "v"))
    _compare(ours, theirs, make_x, dtype, pairs, 0, "TinyLoRA", f"TinyLoRA r={r} u={u} ({model})")


@pytest.mark.parametrize(("n", "g"), [(8, 2), (12, 4), (128, 64)])
def test_rotate_half_is_peft_roads_pairing_and_its_transpose_the_inverse(n: int, g: int) -> None:
    """ops.rotate_half(n, g) is the matrix PEFT's RoAd builds for merging with cos = 0, sin = 1 (its signed
    permutation), applied to rows without building it; transpose=True undoes it."""
    from peft.tuners.road.layer import _get_delta_weight

    P = _get_delta_weight("road_2", g, torch.full((n,), torch.pi / 2), torch.ones(n))  # alpha cos = 0, alpha sin = 1
    P = torch.where(P.abs() > 0.5, P.sign(), torch.zeros(()))  # cos(pi/2) is 4e-8, not 0
    h = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ll.ops.rotate_half(n, g, h), h @ P.T)
    assert torch.equal(ll.ops.rotate_half(n, g, ll.ops.rotate_half(n, g, h), transpose=True), h)
    with pytest.raises(ValueError, match="even group size dividing"):
        ll.ops.rotate_half(n, g + 1, h)


def test_repeat_blocks_shares_road_1s_values_as_peft_does() -> None:
    from peft.tuners.road.layer import _prepare_cols

    theta = torch.randn(12, generator=torch.Generator().manual_seed(1))
    first, second = _prepare_cols("road_1", 4, theta, torch.ones(12))
    assert torch.equal(ll.ops.repeat_blocks(torch.cos(theta), 2, 2), first)
    assert torch.equal(ll.ops.repeat_blocks(torch.sin(theta), 2, 2), second)
    with pytest.raises(ValueError, match="to divide"):
        ll.ops.repeat_blocks(theta, 5, 2)
