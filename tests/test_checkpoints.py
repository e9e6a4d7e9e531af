"""Checkpoints of an attached model: state dicts, save_pretrained, pickling, meta-device models, the base record.

While a residual variant (PiSSA, the AntiPaSTO family) is attached its layers compute with W - E, but every
checkpoint of the model must hold the original W: otherwise loading the checkpoint and then the adapter applies
the residual twice.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import VOCAB, build_qwen
from test_variants import CASES, attach, setup, train
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import lora_lite as ll
from lora_lite.variant import Variant

QWEN_CASES = sorted(case for case in CASES if case.endswith("-qwen"))
RESIDUAL_CASES = [case for case in QWEN_CASES if Variant.for_config(setup(case)[1]).has_residual]


def test_the_residual_variants_are_covered() -> None:
    assert {case.split("-")[0] for case in RESIDUAL_CASES} == {"pissa", "antipasto", "corda", "ablate", "arrow"}


def trained(case: str):
    m, cfg = setup(case)
    base = {k: v.clone() for k, v in m.module.state_dict().items()}
    attach(m, cfg)
    train(m, steps=3, lr=1e-2)
    return m, base


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_state_dict_of_attached_model_holds_the_original_base(case: str) -> None:
    m, base = trained(case)
    state = m.module.state_dict()
    assert any(not torch.equal(layer.weight, base[f"{n}.weight"]) for n, layer in _targets(m.module))  # residuals
    assert {k for k in state if ".lora_" not in k} == set(base)
    for key, value in base.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_load_state_dict_of_its_own_state_dict_keeps_the_outputs(case: str) -> None:
    m, _ = trained(case)
    with torch.no_grad():
        before = m.out()
    m.module.load_state_dict(m.module.state_dict())
    with torch.no_grad():
        assert torch.equal(m.out(), before)


@pytest.mark.parametrize("case", ["pissa-qwen", "antipasto-qwen"])
def test_save_pretrained_while_attached_gives_the_base_and_load_gives_the_trained_model(case: str, tmp_path) -> None:
    m, _ = trained(case)
    fresh, _ = setup(case)
    with torch.no_grad():
        trained_out, base_out = m.out(), fresh.out()
    m.module.save_pretrained(tmp_path / "ckpt")
    ll.save(m.module, tmp_path / "adapter.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unexpected lora_* keys
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(m.inputs).logits, base_out)
    ll.load(reloaded, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(reloaded(m.inputs).logits, trained_out)


@pytest.mark.parametrize("case", RESIDUAL_CASES)
def test_load_refuses_a_base_that_holds_the_residual(case: str, tmp_path) -> None:
    m, _ = trained(case)
    ll.save(m.module, tmp_path / "adapter.safetensors")
    poisoned, _ = setup(case)
    with torch.no_grad():  # what an old checkpoint of the attached model held: the residual as the weight
        for name, layer in _targets(m.module):
            poisoned.module.get_submodule(name).weight.copy_(layer.weight)
    before = {k: v.clone() for k, v in poisoned.module.state_dict().items()}
    with pytest.raises(ValueError, match="already the residual"):
        ll.load(poisoned.module, tmp_path / "adapter.safetensors")
    assert ll.attachment(poisoned.module) is None
    after = poisoned.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case", QWEN_CASES)
def test_pickle_round_trip_of_an_attached_model(case: str) -> None:
    m, _ = trained(case)
    with torch.no_grad():
        before = m.out()
    buffer = io.BytesIO()
    torch.save(m.module, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    copied = pickle.loads(pickle.dumps(m.module))
    deep = copy.deepcopy(m.module)
    base = setup(case)[0].out()
    for model in (restored, copied, deep):
        with torch.no_grad():
            assert torch.equal(model(m.inputs).logits, before)
        ll.detach(model)  # the attachment came along: detach gives the base back
        assert not any(n.rsplit(".", 1)[-1].startswith("lora_") for n, _ in model.named_parameters())
        assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
        with torch.no_grad():
            assert torch.equal(model(m.inputs).logits, base)
    with torch.no_grad():
        assert torch.equal(m.out(), before)  # the original keeps its adapter


@pytest.mark.parametrize("config", [ll.LoRAConfig(r=4), ll.PiSSAConfig(r=4)], ids=["lora", "pissa"])
def test_meta_device_model_is_refused_before_any_change(config, tmp_path) -> None:
    with torch.device("meta"):
        model = build_qwen()
    with pytest.raises(ValueError, match="materialize the model first"):
        ll.attach(model, config)
    real = build_qwen()
    ll.attach(real, config)
    ll.save(real, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="materialize the model first"):
        ll.load(model, tmp_path / "a.safetensors")
    assert ll.attachment(model) is None
    assert all(p.is_meta for p in model.parameters())
    assert not any(n.rsplit(".", 1)[-1].startswith("lora_") for n, _ in model.named_parameters())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_the_adapter_file_records_the_base_and_load_warns_on_another_model(tmp_path) -> None:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPES, num_key_value_heads=2))
    ll.attach(llama, ll.LoRAConfig(r=4))
    ll.save(llama, tmp_path / "a.safetensors")
    mistral = MistralForCausalLM(MistralConfig(**SHAPES, num_key_value_heads=2))
    with pytest.warns(UserWarning, match=r"saved on a LlamaForCausalLM \(model_type='llama'.*MistralForCausalLM"):
        ll.load(mistral, tmp_path / "a.safetensors")
    other_llama = LlamaForCausalLM(LlamaConfig(**SHAPES, num_key_value_heads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.load(other_llama, tmp_path / "a.safetensors")


def _targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(a.target.name, a.target.layer) for a in ll.attachment(model).adapted]
