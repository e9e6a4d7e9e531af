"""attach / detach / save / load on bad input, targeting, configs, and the seed quickstart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_mlp, tiny_qwen
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora_lite as ll
from lora_lite.variant import AdapterConfig, Slot, Variant


def snapshot(model: nn.Module) -> dict:
    """Everything attach may change: tensors, trainable flags, hooks, attributes."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attached": ll.attachment(model) is not None,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["flags"] == before["flags"] and after["hooks"] == before["hooks"]
    assert after["attached"] == before["attached"]


def test_seed_quickstart_unchanged(tmp_path, token_ids) -> None:
    model = tiny_qwen()
    cfg = ll.LoRAConfig(r=8, alpha=16, dtype=torch.bfloat16)
    ll.attach(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(token_ids).logits
    ll.save(model, tmp_path / "adapter.safetensors")
    ll.detach(model)
    ll.load(model, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, trained)


def test_adapter_tensors_are_lora_attributes_in_state_dict() -> None:
    model = tiny_qwen()
    names = ll.attach(model, ll.LoRAConfig(r=4))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    keys = {k for k in model.state_dict() if ".lora_" in k}
    assert keys == {f"{n}.lora_{s}" for n in names for s in ("A", "B")}
    assert set(ll.adapter_state_dict(model)) == keys


def test_saved_metadata(tmp_path) -> None:
    model = tiny_qwen()
    ll.attach(model, ll.DoRAConfig(r=4, dtype=torch.bfloat16))
    ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert meta["variant"] == "dora" and meta["spec_hash"] == ll.DoRA.spec_hash
    assert meta["lora_lite_version"] == ll.__version__
    assert json.loads(meta["config"])["r"] == 4 and json.loads(meta["config"])["dtype"] == "bfloat16"
    assert len(json.loads(meta["targets"])) == 4


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target_names": None}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ({"target_names": None, "target_roles": ("writer",)}, {"k_proj", "v_proj", "o_proj", "down_proj"}),
        ({"target_names": None, "target_roles": ("reader",)}, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}),
        ({"target_names": "proj", "target_roles": ("inner",)}, set()),
    ],
)
def test_target_roles(kwargs: dict, expected: set[str]) -> None:
    cfg = ll.IA3Config(**kwargs)
    from lora_lite.targets import find_targets

    found = {t.name.rsplit(".", 1)[-1] for t in find_targets(tiny_qwen(), cfg)}
    assert found == expected


def test_lm_head_excluded_unless_asked() -> None:
    from lora_lite.targets import find_targets

    model = tiny_qwen()
    assert "lm_head" not in {t.name for t in find_targets(model, ll.IA3Config(target_names=None))}
    everything = ll.IA3Config(target_names=None, exclude_names=None)
    assert "lm_head" in {t.name for t in find_targets(model, everything)}


def test_target_layers() -> None:
    names = ll.attach(tiny_qwen(), ll.LoRAConfig(r=2, target_layers=(1,)))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_nothing_matches_is_a_clear_error_and_changes_nothing() -> None:
    model = tiny_qwen()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no layer matches target_names='nope'.*q_proj"):
        ll.attach(model, ll.LoRAConfig(target_names="nope"))
    assert_unchanged(model, before)


def test_failing_requirement_is_raised_before_any_change() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)PiSSA.*down \(d_in=20, d_out=8, r=16.*r <= min\(d_out, d_in\)"):
        ll.attach(model, ll.PiSSAConfig(r=16, target_names=None))
    assert_unchanged(model, before)


def test_double_attach_detach_without_attach_save_without_attach(tmp_path) -> None:
    model = tiny_mlp()
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.detach(model)
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.save(model, tmp_path / "x.safetensors")
    ll.attach(model, ll.IA3Config(target_names=None))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="already has an adapter attached"):
        ll.attach(model, ll.LoRAConfig(target_names=None))
    assert_unchanged(model, before)


class _FailingConfig(AdapterConfig):
    pass


class _FailsOnSecondLayer(Variant):
    """Its residual raises on the second target, after the first was changed: attach must undo it."""

    name = "test_fails_on_second_layer"
    title = "FailsOnSecondLayer"
    config_class = _FailingConfig
    site = "output"
    has_residual = True
    calls = 0

    @staticmethod
    def slots(cfg, d_in, d_out):
        return [Slot("g", (d_out,), trainable=True)]

    @staticmethod
    def init(cfg, d_in, d_out, W, stats, device):
        return {"g": torch.ones(d_out)}

    @staticmethod
    def residual(layer, cfg, W):
        _FailsOnSecondLayer.calls += 1
        if _FailsOnSecondLayer.calls == 2:
            raise RuntimeError("boom")
        return W * 2

    @staticmethod
    def output(layer, cfg, x, y):
        return y * layer.lora_g


def test_attach_is_all_or_nothing() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        ll.attach(model, _FailingConfig(target_names=None))
    assert_unchanged(model, before)
    assert not any(name.startswith("lora_") for name, _ in model.named_buffers())


def test_load_wrong_shapes_changes_nothing(tmp_path) -> None:
    small = tiny_mlp()
    ll.attach(small, ll.LoRAConfig(r=4, target_names=None))
    ll.save(small, tmp_path / "a.safetensors")
    other = nn.Sequential()
    other.up = nn.Linear(12, 24)
    other.down = nn.Linear(24, 8, bias=False)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"up.lora_B is \(20, 4\) in the file, \(24, 4\) on this model"):
        ll.load(other, tmp_path / "a.safetensors")
    assert_unchanged(other, before)


def test_load_of_a_file_whose_tensors_belong_to_another_variant(tmp_path) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.DoRAConfig(r=4, target_names=None))
    ll.save(model, tmp_path / "dora.safetensors")
    with safe_open(str(tmp_path / "dora.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["variant"], meta["spec_hash"] = "lora", ll.LoRA.spec_hash  # LoRA has no magnitude m
    save_file(tensors, tmp_path / "relabelled.safetensors", metadata=meta)
    fresh = tiny_mlp()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="unexpected tensor up.lora_m"):
        ll.load(fresh, tmp_path / "relabelled.safetensors")
    assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variant": "no_such_variant"}, "unknown variant 'no_such_variant'"),
        ({"format": "something-else"}, "was not written by lora_lite.save"),
        ({"targets": '["nowhere"]'}, "targets 'nowhere', which this model does not have"),
        ({"config": "{not json"}, "the adapter config in the metadata is unreadable"),
        ({"config": '{"r": 4, "bogus": 1}'}, "has no fields"),
    ],
)
def test_load_rejects_bad_metadata(tmp_path, change: dict, message: str) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=None))
    ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    save_file(tensors, tmp_path / "b.safetensors", metadata={**meta, **change})
    fresh = tiny_mlp()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        ll.load(fresh, tmp_path / "b.safetensors")
    assert_unchanged(fresh, before)


def test_load_rejects_a_file_that_is_not_safetensors(tmp_path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ll.load(model, tmp_path / "junk.safetensors")
    assert_unchanged(model, before)


def test_config_validates_hyper_types() -> None:
    with pytest.raises(TypeError, match=r"LoRAConfig.r must be an int, not '8'"):
        ll.LoRAConfig(r="8")
    with pytest.raises(TypeError, match=r"LoRAConfig.r must be an int, not 8.0"):
        ll.LoRAConfig(r=8.0)
    assert ll.LoRAConfig(alpha=32).alpha == 32.0 and isinstance(ll.LoRAConfig(alpha=32).alpha, float)
    with pytest.raises(ValueError, match="not a valid regex"):
        ll.LoRAConfig(target_names="(")
    with pytest.raises(ValueError, match="unknown target_roles"):
        ll.LoRAConfig(target_roles=("head",))


def test_pissa_keeps_a_residual_and_detach_restores_the_same_tensor_storage() -> None:
    model = tiny_mlp()
    original = model.up.weight.data
    ll.attach(model, ll.PiSSAConfig(r=4, target_names="up"))
    assert model.up.weight.data_ptr() != original.data_ptr()
    assert not torch.equal(model.up.weight.data, original)
    ll.detach(model)
    assert model.up.weight.data_ptr() == original.data_ptr()


def test_hook_keeps_the_layer_dtype_with_a_wider_adapter() -> None:
    model = tiny_mlp().to(torch.bfloat16)
    ll.attach(model, ll.LoRAConfig(r=4, target_names=None, dtype=torch.float32))
    out = model(torch.randn(2, 3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert model.up.lora_A.dtype == torch.float32


def test_detach_after_moving_the_model_restores_the_moved_weights() -> None:
    model, reference = tiny_mlp(), tiny_mlp().to(torch.float64)
    ll.attach(model, ll.PiSSAConfig(r=4, target_names=None))
    model.to(torch.float64)  # the stashed original weight must move with the layer
    ll.detach(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    assert torch.equal(model(x), reference(x))


def test_hra_runs_with_a_bf16_model_and_adapter() -> None:
    model = tiny_mlp().to(torch.bfloat16)
    ll.attach(model, ll.HRAConfig(r=4, target_names=None, dtype=torch.bfloat16))
    out = model(torch.randn(2, 3, 12, dtype=torch.bfloat16))
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and model.up.lora_U.grad is not None


def test_calibration_restores_every_module_mode() -> None:
    model = tiny_qwen().train()
    model.model.layers[0].mlp.eval()  # a block deliberately kept in eval
    modes = {name: m.training for name, m in model.named_modules()}
    ll.attach(model, ll.EVAConfig(r=4), calibration_data=[torch.randint(0, 96, (1, 8))])
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_attach_refuses_to_overwrite_an_existing_lora_attribute() -> None:
    model = tiny_mlp()
    model.down.register_parameter("lora_A", torch.nn.Parameter(torch.ones(3)))
    before = snapshot(model)
    with pytest.raises(ValueError, match="down .* already has lora_A; lora-lite would overwrite it"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=None))
    assert_unchanged(model, before)


def test_a_layer_called_with_a_keyword_input_gets_a_clear_error() -> None:
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=None))
    with pytest.raises(TypeError, match="first positional argument"):
        model.up(input=torch.randn(2, 12))
