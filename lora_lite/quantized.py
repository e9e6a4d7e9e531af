"""bitsandbytes base layers: recognise them, dequantize a weight for an init, keep 4-bit layers trainable on CPU.

bitsandbytes is optional: nothing here imports it until a quantized weight has to be dequantized.

The CPU trap this module guards against (bitsandbytes 0.50): `Linear4bit.forward`, on a CPU with
AVX512-BF16, in eval mode and with an input that does not require grad (an `eval()` forward under
`no_grad`, `generate`, or any eval forward of a frozen base), repacks its weight in place into an
inference-only layout (`weight.quant_state.packing_format_for_cpu = True`: the 4-bit codes reordered
in blocks of 32 rows, the scales transposed to bfloat16). From then on every call takes the
`gemv_4bit` path, which has no autograd kernel: backward through the layer silently gives wrong or
zero gradients. The layer's `support_avx512bf16_for_cpu` attribute gates the repack; while an
adapter is attached the runtime sets it to False on every 4-bit layer of the model (detach puts it
back), and refuses to attach to a model whose layers are already repacked: bitsandbytes' own
conversion back is lossy (the scales went through bfloat16).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lora_lite import ops
from lora_lite._text import capped

REPACK_FLAG = "support_avx512bf16_for_cpu"  # Linear4bit attribute: may repack for CPU inference


def is_quantized(layer: nn.Module) -> bool:
    """True for a layer whose weight is a bitsandbytes parameter or not a float tensor."""
    weight = layer.weight
    return type(weight).__module__.startswith("bitsandbytes") or not weight.dtype.is_floating_point


def dense_weight(layer: nn.Module) -> Tensor:
    """The layer's weight [d_out, d_in] as a float32 tensor; quantized weights are dequantized by bitsandbytes."""
    weight = layer.weight
    if weight.dtype.is_floating_point:
        return ops.weight(layer).detach().float()  # transformers' Conv1D stores [d_in, d_out]
    import bitsandbytes.functional as bnbf

    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # Params4bit (nf4, fp4)
        return bnbf.dequantize_4bit(weight.detach(), quant_state).float()
    # Int8Params: the row scales sit on the weight until the first forward, on the layer's state after it.
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:
        return bnbf.int8_vectorwise_dequant(weight.detach(), scales).float()
    raise TypeError(
        f"cannot dequantize the weight of this {type(layer).__name__} ({type(weight).__name__}, {weight.dtype}): "
        "lora-lite knows bitsandbytes' 4-bit (Params4bit) and 8-bit (Int8Params) weights"
    )


def repacked_layers(model: nn.Module) -> list[str]:
    """Names of the 4-bit layers bitsandbytes has repacked into its CPU inference-only layout."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]


def hold_trainable_layout(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Stop every 4-bit layer of `model` from repacking for CPU inference; return what to restore."""
    held = []
    for module in model.modules():
        if hasattr(module, REPACK_FLAG):  # bitsandbytes sets it from a C call: 0 or 1
            held.append((module, getattr(module, REPACK_FLAG)))
            setattr(module, REPACK_FLAG, False)
    return held


def release_trainable_layout(held: list[tuple[nn.Module, object]]) -> None:
    for module, value in held:
        setattr(module, REPACK_FLAG, value)


def repacked_problem(model: nn.Module) -> str | None:
    """The error to raise when some 4-bit layer is already in the inference-only layout, else None."""
    names = repacked_layers(model)
    if not names:
        return None
    shown = ", ".join(capped(names, 3))
    return (
        f"bitsandbytes has repacked {len(names)} 4-bit layers ({shown}) into its CPU inference-only layout, "
        "which it does on an eval() forward without gradients (e.g. generate). Backward through that layout "
        "gives wrong gradients, and converting it back is lossy (its scales went through bfloat16). "
        "Load the model again and attach before any inference: while an adapter is attached, lora-lite keeps "
        "the 4-bit layers in their trainable layout."
    )
