"""modules_to_save: whole modules (a BERT classifier head) trained and saved with the adapter, put back by detach,
and PEFT adapters that carry them imported and exported."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import lora_lite as ll

VOCAB = 96


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


IDS = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 2, 1])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def train(model: torch.nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(IDS, labels=LABELS).loss.backward()
        opt.step()
        opt.zero_grad()


def test_classifier_head_is_trained_saved_loaded_and_restored(tmp_path) -> None:
    model = bert()
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = logits(model)
    cfg = ll.LoRAConfig(r=4, target_names=["query", "value"], modules_to_save="classifier")
    ll.attach(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or ".lora_" in n for n in trainable)
    train(model)
    assert not torch.equal(model.classifier.weight, head["weight"])
    trained = logits(model)
    ll.save(model, tmp_path / "a.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(ll.adapter_state_dict(model))
    ll.detach(model)
    assert all(torch.equal(model.classifier.state_dict()[k], v) for k, v in head.items())
    assert torch.equal(logits(model), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    fresh = bert()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), trained)
    assert fresh.classifier.weight.requires_grad
    ll.detach(fresh)
    assert torch.equal(logits(fresh), base)


def test_modules_to_save_naming_no_module_is_refused_before_any_change() -> None:
    model = bert()
    with pytest.raises(ValueError, match="no module is named 'score'"):
        ll.attach(model, ll.LoRAConfig(r=4, target_names="query", modules_to_save=("score",)))
    assert ll.attachment(model) is None and not any(".lora_" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="holds the target"):
        ll.attach(model, ll.LoRAConfig(r=4, target_names="query", modules_to_save=("attention",)))
    assert ll.attachment(model) is None


def test_import_and_export_peft_adapters_with_modules_to_save(tmp_path) -> None:
    model = bert()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    train(peft_model)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = bert()
    ll.import_peft(ours, tmp_path / "peft")
    assert (logits(ours) - expected).abs().max() < 1e-5
    assert ours.classifier.weight.requires_grad
    ll.export_peft(ours, tmp_path / "back")
    again = PeftModel.from_pretrained(bert(), tmp_path / "back").eval()
    assert (logits(again) - expected).abs().max() < 1e-5
    ll.detach(ours)
    assert torch.equal(logits(ours), logits(bert()))


def test_a_saved_head_loads_into_a_model_of_another_dtype(tmp_path) -> None:
    model = bert()
    ll.attach(model, ll.LoRAConfig(r=4, target_names="query", modules_to_save=("classifier",)))
    train(model)
    ll.save(model, tmp_path / "a.safetensors")
    half = bert().to(torch.bfloat16)
    ll.load(half, tmp_path / "a.safetensors")
    assert half.classifier.weight.dtype == torch.bfloat16
    assert torch.equal(half.classifier.weight, model.classifier.weight.detach().to(torch.bfloat16))
