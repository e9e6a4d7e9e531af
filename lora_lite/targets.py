"""Which layers an adapter attaches to: linear-like modules, filtered by name, role and block index.

Names match whole dotted components: a `target_names` regex must match the full module name or
a whole dotted tail of it, so `q_proj|v_proj` selects `model.layers.0.self_attn.q_proj` but not
Phi-3's `qkv_proj`, and `self_attn\\..*` selects everything under `self_attn`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lora_lite import ops
from lora_lite._text import capped
from lora_lite.variant import AdapterConfig

# The spec defaults use Llama's names. Families without them get theirs, as PEFT's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING does: one table keyed by `config.model_type`,
# each mapping a Llama name to the family's regex. A fused layer (GPT-2's `c_attn`, GPT-NeoX's
# `query_key_value`, Phi-3's `qkv_proj`) stands for all of q, k and v, as in PEFT.
_NEOX = {
    "q_proj": "query_key_value",
    "k_proj": "query_key_value",
    "v_proj": "query_key_value",
    "up_proj": "dense_h_to_4h",
    "down_proj": "dense_4h_to_h",
}
_BERT = {
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": r"attention\.output\.dense",
    "up_proj": r"intermediate\.dense",
    "down_proj": r"\d+\.output\.dense",
}
_T5 = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "up_proj": "wi|wi_0|wi_1", "down_proj": "wo"}
FAMILY_NAMES: dict[str, dict[str, str]] = {
    "gpt2": {
        "q_proj": "c_attn",
        "k_proj": "c_attn",
        "v_proj": "c_attn",
        "o_proj": r"attn\.c_proj",
        "up_proj": "c_fc",
        "down_proj": r"mlp\.c_proj",
    },
    "gpt_neox": _NEOX | {"o_proj": r"attention\.dense"},
    "falcon": _NEOX | {"o_proj": r"self_attention\.dense"},
    "bloom": _NEOX | {"o_proj": r"self_attention\.dense"},
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "t5": _T5,
    "mt5": _T5,
    "phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "up_proj": "gate_up_proj"},
}


@dataclass
class Target:
    name: str
    layer: nn.Module
    d_in: int
    d_out: int


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, anything shaped like it (bitsandbytes Linear4bit/Linear8bitLt, ...), and transformers' Conv1D."""
    if ops.is_conv1d(module):
        return getattr(module, "weight", None) is not None and module.weight.dim() == 2
    return all(hasattr(module, a) for a in ("in_features", "out_features", "weight")) and isinstance(
        module.in_features, int
    )


def name_matches(pattern: str, name: str) -> bool:
    """True when the regex `pattern` matches the whole of `name` or a whole dotted tail of it."""
    parts = name.split(".")
    return any(re.fullmatch(pattern, ".".join(parts[i:])) for i in range(len(parts)))


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
    config = _text_config(model)
    return getattr(config, "hidden_size", None)


def model_type(model: nn.Module) -> str | None:
    """`model.config.model_type` (of the text model, for multimodal configs), or None."""
    return getattr(_text_config(model), "model_type", None)


def target_pattern(model: nn.Module, cfg: AdapterConfig) -> str | None:
    """The regex `cfg` selects names with: `cfg.target_names`, or, when that is the spec's default
    and the model's family names its layers differently (FAMILY_NAMES), the family's names."""
    default = type(cfg).__dataclass_fields__["target_names"].default
    family = FAMILY_NAMES.get(model_type(model) or "")
    if cfg.target_names is None or cfg.target_names != default or family is None:
        return cfg.target_names
    names = [family.get(name, name) for name in cfg.target_names.split("|")]
    return "|".join(dict.fromkeys(names))


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Every linear-like layer the config selects, in module order.

    Raises ValueError when the name filter selects a module lora-lite cannot adapt (see
    `unadaptable`), naming it and why, before anything is changed.
    """
    hidden = hidden_size(model)
    if cfg.target_roles is not None and hidden is None:
        raise ValueError("target_roles needs model.config.hidden_size; this model has none: use target_names")
    pattern = target_pattern(model, cfg)
    # The model's own embedding modules count as excluded names, whatever they are called.
    embeddings = {id(m) for m in _embedding_modules(model)} if cfg.exclude_names is not None else set()
    refused = unadaptable(model)
    if pattern is not None:
        named = [
            f"{name}: {why}"
            for name, (why, aliases) in refused.items()
            if any(name_matches(pattern, a) for a in aliases)
            and not (cfg.exclude_names is not None and any(name_matches(cfg.exclude_names, a) for a in aliases))
        ]
        if named:
            shown = "\n  ".join(capped(named, 5))
            raise ValueError(
                f"target_names={pattern!r} selects modules lora-lite cannot adapt:\n  {shown}\n"
                "Narrow target_names (or add them to exclude_names)."
            )
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear_like(module) or id(module) in embeddings or name in refused:
            continue
        if cfg.exclude_names is not None and name_matches(cfg.exclude_names, name):
            continue
        if pattern is not None and not name_matches(pattern, name):
            continue
        if cfg.target_layers is not None and block_index(name) not in cfg.target_layers:
            continue
        d_in, d_out = ops.d_in(module), ops.d_out(module)
        if cfg.target_roles is not None and not roles(d_in, d_out, hidden) & set(cfg.target_roles):
            continue
        found.append(Target(name, module, d_in, d_out))
    return found


def unadaptable(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Modules a forward hook cannot adapt: {name: (why, the names a target_names regex may use for it)}.

    - a linear layer owned by `nn.MultiheadAttention` (its `out_proj`): the attention applies the
      weight inside `F.multi_head_attention_forward` and never calls the layer, so a hook there
      never runs;
    - a module holding fused 3-D weights (the experts of a transformers 5 mixture-of-experts block,
      Qwen3-MoE's and Mixtral's `mlp.experts.gate_up_proj` [E, 2 * inter, hidden]): its forward
      indexes or batches them directly, with no linear layer per expert to hook.
    """
    found: dict[str, tuple[str, list[str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, child in module.named_children():
                if is_linear_like(child):
                    found[f"{name}.{child_name}" if name else child_name] = (
                        f"{type(child).__name__} owned by nn.MultiheadAttention, which reads its weight inside "
                        "F.multi_head_attention_forward and never calls the layer: a hook there would never run",
                        [f"{name}.{child_name}" if name else child_name],
                    )
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        fused = [(p, tuple(t.shape)) for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
        if fused and name and "expert" in f"{type(module).__name__} {name}".lower():
            shapes = ", ".join(f"{p} {list(shape)}" for p, shape in fused)
            found[name] = (
                f"{type(module).__name__} holds fused 3-D weights ({shapes}), one slice per expert, and its "
                "forward uses them directly, with no linear layer per expert for a hook: lora-lite does not "
                "adapt mixture-of-experts experts; target the attention projections (and any dense or "
                "shared-expert linear layers) instead",
                [name] + [f"{name}.{p}" for p, _ in fused],
            )
    return found


def describe_candidates(model: nn.Module, limit: int = 8, exclude: str | None = None) -> str:
    """The model's linear layers (those lora-lite can adapt), and their last names not in `exclude`, for errors."""
    refused = unadaptable(model)
    names = [n for n, m in model.named_modules() if n and is_linear_like(m) and n not in refused]
    shown = ", ".join(capped(names, limit))
    if not names:
        return "none: the model has no linear-like layers"
    tails = sorted({n.rsplit(".", 1)[-1] for n in names if exclude is None or not name_matches(exclude, n)})
    return f"{shown}; pass target_names a list of their names, e.g. target_names={tails[:4]}"


def _text_config(model: nn.Module) -> object | None:
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)() if config is not None else None


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
