"""Small Qwen3 models from configs, with random weights: the one builder the benchmark, the demo and the tests share.

Nothing is downloaded: `qwen3_config` fills in transformers' `Qwen3Config` from
a few sizes, `qwen3_0_6b_config` gives Qwen3-0.6B's layer shapes (hidden 1024,
intermediate 3072, 16 query and 8 key/value heads of 128; 28 layers and a
151,936-word vocabulary unless told otherwise), and `qwen3` builds the model
from a config with seeded random weights. Needs transformers (the `demo`,
`bench` and `dev` extras).
"""

from __future__ import annotations

from typing import Any

import torch


def qwen3_config(
    vocab_size: int = 96,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    **extra: Any,
):
    """A `transformers.Qwen3Config` of these sizes; `head_dim` defaults to hidden_size // heads, and `extra`
    goes to Qwen3Config as is (tie_word_embeddings, attention_bias, pad_token_id, initializer_range, ...)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden_size // heads,
        **extra,
    )


def qwen3_0_6b_config(hidden_size: int = 1024, layers: int = 28, vocab_size: int = 151_936, **extra: Any):
    """Qwen3-0.6B's shapes: intermediate 3 x hidden, hidden // 64 query heads of 128 (twice the hidden size),
    half as many key/value heads, tied embeddings. At hidden 1024 these are the real model's layer sizes; a
    smaller hidden keeps the proportions."""
    heads = hidden_size // 64
    extra.setdefault("tie_word_embeddings", True)
    return qwen3_config(vocab_size, hidden_size, 3 * hidden_size, layers, heads, heads // 2, 128, **extra)


def qwen3(config, seed: int = 0) -> torch.nn.Module:
    """`Qwen3ForCausalLM(config)` in eval mode, its random weights drawn after `torch.manual_seed(seed)`."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()
