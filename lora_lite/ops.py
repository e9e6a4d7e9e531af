"""The few tensor helpers generated code calls (`from lora_lite import ops`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def kaiming_uniform(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Kaiming-uniform with a=sqrt(5), fan_in = shape[-1]: nn.Linear's and PEFT's lora_A init."""
    out = torch.empty(shape, device=device)
    bound = 1.0 / math.sqrt(shape[-1]) if shape and shape[-1] > 0 else 0.0
    with torch.no_grad():
        return out.uniform_(-bound, bound)


def svd(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets (U [m, k], S [k], Vt [k, n]) of a matrix, in float32."""
    U, S, Vt = torch.linalg.svd(matrix.float(), full_matrices=False)
    return U[:, :k].contiguous(), S[:k].contiguous(), Vt[:k].contiguous()


def bias(layer: nn.Module, dtype: torch.dtype) -> Tensor | float:
    """The layer's bias in `dtype`, or 0.0 when it has none."""
    b = getattr(layer, "bias", None)
    return 0.0 if b is None else b.to(dtype)
