"""lora-lite: hackable PyTorch adapters, each variant compiled from a short `.adapter` spec.

    import torch, lora_lite as ll
    cfg = ll.LoRAConfig(r=8, alpha=16, dtype=torch.bfloat16)
    ll.attach(model, cfg)
    ...train...
    ll.save(model, "adapter.safetensors")
    ll.detach(model)
    ll.load(model, "adapter.safetensors")

Names load lazily, so `lora-lite compile` never imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_RUNTIME = {
    "attach": "lora_lite.runtime",
    "detach": "lora_lite.runtime",
    "save": "lora_lite.runtime",
    "load": "lora_lite.runtime",
    "attachment": "lora_lite.runtime",
    "adapter_state_dict": "lora_lite.runtime",
    "AdapterConfig": "lora_lite.variant",
    "Slot": "lora_lite.variant",
    "Variant": "lora_lite.variant",
    "merge": "lora_lite.merging",
    "MergeError": "lora_lite.merging",
    "export_peft": "lora_lite.peft_interop",
    "import_peft": "lora_lite.peft_interop",
    "PeftInteropError": "lora_lite.peft_interop",
}


def _generated() -> dict[str, str]:
    """Public name -> generated module, from the index the compiler writes."""
    from lora_lite.generated import VARIANTS

    names = {}
    for cls, module in VARIANTS.items():
        names[cls] = names[cls + "Config"] = f"lora_lite.generated.{module}"
    return names


def import_variants() -> None:
    """Import every generated variant module, registering its variant for `load`."""
    for module in sorted(set(_generated().values())):
        importlib.import_module(module)


def __getattr__(name: str) -> object:
    module = _RUNTIME.get(name) or _generated().get(name)
    if module is None:
        raise AttributeError(f"module 'lora_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_RUNTIME) | set(_generated()))
