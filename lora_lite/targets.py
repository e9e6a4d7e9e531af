"""Which layers an adapter attaches to: linear-like modules, filtered by name, role and block index."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lora_lite._text import capped
from lora_lite.variant import AdapterConfig


@dataclass
class Target:
    name: str
    layer: nn.Module
    d_in: int
    d_out: int


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and anything shaped like it (bitsandbytes Linear4bit/Linear8bitLt, ...)."""
    return all(hasattr(module, a) for a in ("in_features", "out_features", "weight")) and isinstance(
        module.in_features, int
    )


def block_index(name: str) -> int | None:
    """The first integer component of a module name: `model.layers.3.mlp` -> 3."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def roles(d_in: int, d_out: int, hidden: int) -> set[str]:
    found = set()
    if d_in == hidden:
        found.add("reader")
    if d_out == hidden:
        found.add("writer")
    return found or {"inner"}


def hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    return getattr(config, "hidden_size", None)


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Every linear-like layer the config selects, in module order."""
    hidden = hidden_size(model)
    if cfg.target_roles is not None and hidden is None:
        raise ValueError("target_roles needs model.config.hidden_size; this model has none: use target_names")
    # The model's own embedding modules count as excluded names, whatever they are called.
    embeddings = {id(m) for m in _embedding_modules(model)} if cfg.exclude_names is not None else set()
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module) or id(module) in embeddings:
            continue
        if cfg.exclude_names is not None and re.search(cfg.exclude_names, name):
            continue
        if cfg.target_names is not None and not re.search(cfg.target_names, name):
            continue
        if cfg.target_layers is not None and block_index(name) not in cfg.target_layers:
            continue
        d_in, d_out = module.in_features, module.out_features
        if cfg.target_roles is not None and not roles(d_in, d_out, hidden) & set(cfg.target_roles):
            continue
        found.append(Target(name, module, d_in, d_out))
    return found


def describe_candidates(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    shown = ", ".join(capped(names, limit))
    return shown or "none: the model has no linear-like layers"


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None:
            found.append(module)
    return found
