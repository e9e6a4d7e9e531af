"""The benchmark's base model: a small Qwen3 pretrained in process on the task's corpus, cached on disk.

The cache (`$LORA_LITE_CACHE`, else ~/.cache/lora-lite) holds one folder per
pretraining key (`Settings.pretrain_key`: sizes, steps, learning rate, seed,
vocabulary and corpus version), so a second run with the same settings skips
pretraining and a change to any of them pretrains anew.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from lora_lite.bench import core, task
from lora_lite.bench.settings import Settings


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_LITE_CACHE") or Path.home() / ".cache" / "lora-lite")


def example(problem: task.Problem, tok: task.Tokenizer) -> core.Example:
    """A problem as a prompt (beginning of sequence, then the question) and a target (the answer, then the end)."""
    return core.Example(
        [tok.bos_id, *tok.encode(problem.question)], [*tok.encode(problem.answer), tok.eos_id], str(problem.result)
    )


def model_config(settings: Settings, tok: task.Tokenizer):
    from lora_lite.tiny import qwen3_config

    return qwen3_config(
        len(tok),
        settings.hidden,
        settings.intermediate,
        settings.layers,
        settings.heads,
        settings.kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )


def pretrained_base(settings: Settings, tok: task.Tokenizer, cache: Path) -> nn.Module:
    """The pretrained base: from the cache when its key is there, else pretrained now and cached."""
    from tqdm import tqdm
    from transformers import Qwen3ForCausalLM

    from lora_lite.tiny import qwen3

    folder = cache / f"bench-base-{settings.pretrain_key()}"
    if (folder / "config.json").exists():
        print(f"pretrained base: {folder} (cached)")
        return Qwen3ForCausalLM.from_pretrained(folder).eval()
    model = qwen3(model_config(settings, tok), seed=settings.seed)
    lines = task.pretraining_corpus(settings.pretrain_steps * settings.pretrain_batch, settings.seed)
    examples = [core.Example([tok.bos_id], [*tok.encode(line), tok.eos_id], "") for line in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.pretrain_lr, total_steps=settings.pretrain_steps, pct_start=0.1
    )
    model.train()
    bar = tqdm(range(settings.pretrain_steps), desc="pretraining the base", unit="step", file=sys.stderr)
    for step in bar:
        chunk = examples[step * settings.pretrain_batch : (step + 1) * settings.pretrain_batch]
        loss = core.train_step(model, optimizer, core.train_batch(chunk, tok.pad_id))
        schedule.step()
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.replace(folder) if not folder.exists() else None
    print(f"pretrained base: saved to {folder}")
    return Qwen3ForCausalLM.from_pretrained(folder).eval()
