"""Training stacks on an attached model: transformers' Trainer, TRL's SFTTrainer, accelerate, a bitsandbytes base.

Tiny models, a few steps, on the CPU (`use_cpu=True`, `report_to=[]`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import Accelerator
from conftest import VOCAB, build_qwen, tiny_qwen
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast, Trainer, TrainingArguments

import lora_lite as ll
from lora_lite.hf import ADAPTER_FILE, AdapterTrainerMixin
from lora_lite.hf import Trainer as AdapterTrainer

ROWS = [
    {"input_ids": ids, "labels": ids}
    for ids in torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3)).unbind()
]
PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**(base | kw))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROBE).logits


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ll.adapter_state_dict(model).items()}


def test_trainer_checkpoints_hold_the_adapter_file_and_resume(tmp_path) -> None:
    model = tiny_qwen()
    ll.attach(model, ll.LoRAConfig(r=4))
    before = adapter(model)
    trainer = AdapterTrainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=ROWS)
    trainer.train()
    assert all(not torch.equal(v, before[k]) for k, v in adapter(model).items() if k.endswith("lora_B"))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / ADAPTER_FILE).exists()
    assert not list(checkpoint.glob("model*"))  # no copy of the base
    trainer.save_model(str(tmp_path / "final"))
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [ADAPTER_FILE, "training_args.bin"]
    fresh = tiny_qwen()
    ll.load(fresh, tmp_path / "final" / ADAPTER_FILE)
    assert torch.equal(logits(fresh), logits(model))
    # Resuming from checkpoint-2 on a fresh attached model gets to the same adapter as the run without a break.
    resumed = tiny_qwen()
    ll.attach(resumed, ll.LoRAConfig(r=4))
    again = AdapterTrainer(model=resumed, args=args(tmp_path, output_dir=str(tmp_path / "again")), train_dataset=ROWS)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 4
    for key, value in adapter(model).items():
        torch.testing.assert_close(adapter(resumed)[key], value, rtol=1e-5, atol=1e-6)


def test_trainer_load_best_model_at_end_reads_the_adapter_file(tmp_path) -> None:
    model = tiny_qwen()
    ll.attach(model, ll.LoRAConfig(r=4))
    steps = dict(save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)
    best = dict(load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)  # the worse one
    trainer = AdapterTrainer(model=model, args=args(tmp_path, **steps, **best), train_dataset=ROWS, eval_dataset=ROWS)
    trainer.train()
    chosen = trainer.state.best_model_checkpoint
    assert chosen.endswith("checkpoint-2")  # the loss falls, so the higher eval loss is the first checkpoint's
    fresh = tiny_qwen()
    ll.load(fresh, f"{chosen}/{ADAPTER_FILE}")
    loaded = ll.adapter_state_dict(fresh)
    assert all(torch.equal(v, loaded[k]) for k, v in adapter(model).items())


def test_plain_trainer_save_model_of_a_residual_variant_holds_the_original_base(tmp_path) -> None:
    model = tiny_qwen()
    base = logits(tiny_qwen())
    ll.attach(model, ll.PiSSAConfig(r=4))
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=ROWS)
    trainer.train()
    trained = logits(model)
    trainer.save_model(str(tmp_path / "full"))
    ll.save(model, tmp_path / "a.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lora_* keys are unexpected to from_pretrained
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert torch.equal(logits(reloaded), base)
    ll.load(reloaded, tmp_path / "a.safetensors")
    assert torch.equal(logits(reloaded), trained)


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def test_sft_trainer_trains_and_saves_the_adapter(tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    class AdapterSFTTrainer(AdapterTrainerMixin, SFTTrainer):
        pass

    g = torch.Generator().manual_seed(5)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (10,), generator=g)) for _ in range(8)]
    model = tiny_qwen()
    ll.attach(model, ll.DoRAConfig(r=4))
    before = adapter(model)
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=16,
        disable_tqdm=True,
    )
    trainer = AdapterSFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=word_tokenizer()
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(v, before[k]) for k, v in adapter(model).items())
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / ADAPTER_FILE).exists() and not list((tmp_path / "final").glob("model*"))
    fresh = tiny_qwen()
    ll.load(fresh, tmp_path / "final" / ADAPTER_FILE)
    # SFTConfig trains in bf16 here, and accelerate leaves model.forward wrapped in autocast: compare the tensors.
    loaded = ll.adapter_state_dict(fresh)
    assert all(torch.equal(loaded[k], v) for k, v in adapter(model).items())


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("qwen3")
    build_qwen(intermediate_size=128).save_pretrained(path)  # d_in a multiple of bitsandbytes' CPU block size
    return str(path)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_trainer_on_a_bitsandbytes_base(saved_qwen: str, quant: str, tmp_path) -> None:
    bnb = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if quant == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(saved_qwen, quantization_config=bnb, device_map="cpu")
    ll.attach(model, ll.LoRAConfig(r=4))
    with pytest.raises(ValueError, match="purely quantized"):  # what the mixin is for
        Trainer(model=model, args=args(tmp_path), train_dataset=ROWS)
    before = adapter(model)
    trainer = AdapterTrainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=ROWS)
    assert "_hf_peft_config_loaded" not in vars(model)  # set for the constructor only
    trainer.train()
    assert all(not torch.equal(v, before[k]) for k, v in adapter(model).items() if k.endswith("lora_B"))
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / ADAPTER_FILE).exists() and not list((tmp_path / "final").glob("model*"))
    fresh = AutoModelForCausalLM.from_pretrained(saved_qwen, quantization_config=bnb, device_map="cpu")
    ll.load(fresh, tmp_path / "final" / ADAPTER_FILE)
    model.train(), fresh.train()  # 8-bit layers run their int8 inference matmul in eval mode
    with torch.no_grad():
        assert torch.equal(fresh(PROBE).logits, model(PROBE).logits)


def test_accelerate_prepare_trains_an_attached_model(tmp_path) -> None:
    model = tiny_qwen()
    ll.attach(model, ll.LoRAConfig(r=4))
    before = adapter(model)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(ROWS, batch_size=4)
    prepared, opt, loader = accelerator.prepare(model, opt, loader)
    prepared.train()
    losses = []
    for _ in range(2):
        for batch in loader:
            loss = prepared(**batch).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    unwrapped = accelerator.unwrap_model(prepared)
    assert all(not torch.equal(v, before[k]) for k, v in adapter(unwrapped).items())
    ll.save(unwrapped, tmp_path / "a.safetensors")
    fresh = tiny_qwen()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), logits(unwrapped))
