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
        registered = _registered(name)
        if registered is not None:
            return registered  # not cached: a re-import of its module replaces it
        raise AttributeError(
            f"module 'lora_lite' has no attribute {name!r}: a variant of yours is reached here once its "
            "generated module is imported"
        )
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _registered(name: str) -> object:
    """A variant registered from outside the package (or its config), by class name; None if none is."""
    import sys

    variant_module = sys.modules.get("lora_lite.variant")  # not imported yet: no variant of yours is either
    if variant_module is None:
        return None
    for variant in variant_module.Variant.registry.values():
        if variant.__name__ == name:
            return variant
        if variant.config_class.__name__ == name:
            return variant.config_class
    return None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_RUNTIME) | set(_generated()))
