"""Hugging Face `Trainer` and TRL's `SFTTrainer` on a model with a lora-lite adapter attached.

    class SFT(lora_lite.hf.AdapterTrainerMixin, trl.SFTTrainer): ...
    trainer = lora_lite.hf.Trainer(model=model, args=args, train_dataset=data)   # transformers.Trainer, mixed in

The mixin changes two things of the trainer it is mixed into, and only while an adapter is attached:

- Saving (`save_model`, and each `checkpoint-N` folder): the folder gets the adapter file `adapter.safetensors`
  (`lora_lite.save`), not a full copy of the base model; the tokenizer and training arguments are saved as the
  Trainer saves them. `resume_from_checkpoint` and `load_best_model_at_end` read the adapter file back into the
  attached adapter, in place.
- A 4-bit/8-bit bitsandbytes base: transformers refuses to train "purely quantized models" unless the model says
  it carries an adapter, which it reads from `model._hf_peft_config_loaded` (set by its own PEFT integration). The
  mixin sets that flag for the trainer's constructor only, when an adapter is attached, and removes it after:
  left set, `save_pretrained` would take the model for a PEFT one.

Without the mixin, `Trainer` trains an attached model as it is (tested), and `save_model` writes the full model,
with the original base weights even for residual variants (see `lora_lite.runtime._ResidualSwap`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lora_lite import runtime

ADAPTER_FILE = "adapter.safetensors"
TRAINING_ARGS_NAME = "training_args.bin"  # the name transformers.Trainer gives it


class AdapterTrainerMixin:
    """Mix in before a `transformers.Trainer` subclass (`class T(AdapterTrainerMixin, SFTTrainer)`): checkpoints hold
    the adapter file, and an adapter on a bitsandbytes 4-bit/8-bit base is accepted. See the module docstring."""

    def __init__(self, model: nn.Module | None = None, *args: object, **kwargs: object) -> None:
        flag = (
            model is not None
            and runtime.attachment(model) is not None
            and getattr(model, "is_quantized", False)
            and not getattr(model, "_hf_peft_config_loaded", False)
        )
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if flag:
                del model._hf_peft_config_loaded

    def _adapted_model(self) -> nn.Module | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if runtime.attachment(model) is not None else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapted_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return None
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        runtime.save(model, folder / ADAPTER_FILE)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, folder / TRAINING_ARGS_NAME)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        adapted = self.accelerator.unwrap_model(self.model if model is None else model)
        if runtime.attachment(adapted) is None or not path.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        load_adapter_values(adapted, path)
        return None

    def _load_best_model(self) -> None:
        path = Path(self.state.best_model_checkpoint) / ADAPTER_FILE
        model = self._adapted_model()
        if model is None or not path.exists():
            return super()._load_best_model()
        load_adapter_values(model, path)
        return None


def load_adapter_values(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the tensors of an adapter file into the adapter attached to `model`, in place (the optimizer's
    parameters stay the same objects). The file must hold exactly the attached adapter's keys and shapes."""
    current = runtime.adapter_state_dict(model)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(current):
            missing, extra = sorted(set(current) - keys), sorted(keys - set(current))
            raise ValueError(
                f"{path} does not hold the attached adapter: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        values = {key: f.get_tensor(key) for key in keys}
    bad = [k for k, v in values.items() if v.shape != current[k].shape]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad[:5])} differ in shape from the attached adapter")
    with torch.no_grad():
        for key, value in values.items():
            current[key].copy_(value)


def _trainer_class() -> type:
    from transformers import Trainer as HFTrainer

    return type("Trainer", (AdapterTrainerMixin, HFTrainer), {"__module__": __name__, "__doc__": HFTrainer.__doc__})


def __getattr__(name: str) -> object:
    if name == "Trainer":  # built on first use: transformers is an optional dependency
        globals()["Trainer"] = cls = _trainer_class()
        return cls
    raise AttributeError(f"module 'lora_lite.hf' has no attribute {name!r}")
