"""Gradient checkpointing (transformers, reentrant and not) gives the gradients of a plain backward.

The recomputation reruns each decoder layer's forward, and with it our hooks; the
adapter gradients must not change. `pytest -s` prints the max abs differences.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_qwen
from torch import Tensor, nn

import lora_lite as ll
from lora_lite.demo import CASES

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")


def batch() -> Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))


def adapted(title: str) -> tuple[nn.Module, Tensor]:
    """The tiny Qwen3 with `title` attached, its trainable tensors moved off their init so every path has grads."""
    model, ids = tiny_qwen(), batch()
    case = next(c for c in CASES if c.name == title)
    ll.attach(model, case.config(), calibration_data=[ids])
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.train(), ids


def grads(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    torch.manual_seed(0)  # the same training-time draws (PVeRA's samples) in every run: checkpointing replays them
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("title", [c.name for c in CASES])
def test_checkpointing_gives_the_same_gradients(title: str, reentrant: bool) -> None:
    model, ids = adapted(title)
    expected = grads(model, ids)
    assert len(expected) == sum(p.requires_grad for p in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    got = grads(model, ids)
    assert len(calls) == 2  # the forward, then the recomputation in backward
    assert got.keys() == expected.keys()
    diff = max((got[k] - expected[k]).abs().max().item() for k in expected)
    print(f"\n{title} {'reentrant' if reentrant else 'non-reentrant'}: max abs grad diff {diff:.1e}", end="")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_needs_input_grads_on_a_frozen_base() -> None:
    """Reentrant checkpointing drops the grads of a block whose inputs need none: the embeddings are frozen.

    transformers' gradient_checkpointing_enable (5.x) calls enable_input_require_grads for
    input_ids models; without it no adapter inside a checkpointed layer gets a gradient.
    """
    model, ids = adapted("LoRA")
    expected = grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    with pytest.warns(UserWarning, match="requires_grad"), pytest.raises(RuntimeError, match="does not require grad"):
        grads(model, ids)
    model.enable_input_require_grads()
    got = grads(model, ids)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
