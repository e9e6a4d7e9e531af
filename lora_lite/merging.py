"""merge: fold an attached adapter into the base weights, for serving without lora-lite.

The runtime trains with hooks only; a merge is a one-way export into plain weights. The compiler
derives each variant's merge from its forward rule (`merged` in the generated module) whenever the
rule is affine in x, and otherwise states why not (`merge_refusal`), so nothing here knows a variant.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from lora_lite import ops, quantized, runtime
from lora_lite._text import capped


class MergeError(ValueError):
    """The adapter cannot be merged into this model; the model is left as it was."""


def merge(model: nn.Module) -> nn.Module:
    """Replace each adapted layer's weight (and bias) by the merged ones and remove the adapter.

    Returns `model` itself: a plain model with no hooks and no `lora_*` tensors whose outputs equal
    the adapted model's (up to float rounding). The merge is computed in float32 from the layers'
    current tensors and cast once to each layer's weight dtype (fp32, bf16 or fp16).

    Raises:
        RuntimeError: no adapter is attached.
        MergeError: the variant's forward is not affine in x (the compiler's reason is given), a
            target has a quantized (bitsandbytes) weight, the merged bias is nonzero on a layer that
            has no bias, or a merged value is not finite. Nothing is changed then.
    """
    state = runtime.attachment(model)
    if state is None:
        raise RuntimeError("cannot merge the model: no lora-lite adapter is attached (call lora_lite.attach first)")
    variant = state.variant
    if variant.merge_refusal:
        raise MergeError(f"{variant.title} cannot be merged into the base weights: {variant.merge_refusal}")
    quantized_targets = [a.target.name for a in state.adapted if quantized.is_quantized(a.target.layer)]
    if quantized_targets:
        shown = ", ".join(capped(quantized_targets, 5))
        raise MergeError(
            f"cannot merge into quantized (bitsandbytes) layers ({shown}): their weights cannot hold the merged "
            "values. Load the base in float32/bfloat16/float16, load the adapter, then merge"
        )
    merged: list[tuple[nn.Module, Tensor, Tensor | None]] = []
    problems = []
    with torch.no_grad():
        for adapted in state.adapted:
            layer, name = adapted.target.layer, adapted.target.name
            weight, bias = variant.merged(layer, state.cfg)
            if not isinstance(bias, Tensor):  # a constant (0.0 when the rule adds nothing to the layer's bias)
                bias = torch.full(weight.shape[:1], float(bias), device=weight.device)
            if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
                problems.append(f"{name}: the merged values are not finite")
            elif getattr(layer, "bias", None) is None:
                if bias.abs().max() > 0:
                    problems.append(f"{name} has no bias, and the merged map adds one (a checkpoint could not hold it)")
                bias = None
            merged.append((layer, weight, bias))
    if problems:
        raise MergeError(f"cannot merge {variant.title}: " + runtime._join(problems))
    runtime.detach(model)
    with torch.no_grad():
        for layer, weight, bias in merged:
            stored = layer.weight
            stored.copy_((weight.T if ops.is_conv1d(layer) else weight).to(stored.dtype))  # Conv1D: [d_in, d_out]
            if bias is not None:
                layer.bias.copy_(bias.to(layer.bias.dtype))
    return model


# Files a tokenizer may keep beside a checkpoint: copied into the merged folder when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)


def merge_checkpoint(
    model: nn.Module, adapter: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Load the adapter file into `model` (the base, as loaded from the checkpoint folder `base`), merge,
    and write a plain checkpoint to `out` (safetensors, config, generation config, and the tokenizer
    files of `base` when present) that `from_pretrained` loads without lora-lite.

    Raises:
        OSError: a file or folder cannot be read or written.
        ValueError: the adapter does not fit the model, or MergeError.
    """
    base, out = Path(base), Path(out)
    runtime.load(model, adapter)
    merge(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out
