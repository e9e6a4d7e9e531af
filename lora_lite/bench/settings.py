"""The benchmark's settings: the base model, its pretraining, the fine-tuning rows and the seeds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from lora_lite.bench import task

CORPUS_VERSION = 2  # bump when task.py's corpus changes: it is part of the cache key
WARMUP_STEPS = 3  # steps of each seed left out of the median step time
PASS_FRACTION = 0.5  # a row passes when its mean accuracy is at least this fraction of full fine-tuning's


@dataclass(frozen=True)
class Settings:
    hidden: int = 128
    layers: int = 3
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 1200
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-3
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds: adapter init and batch order; one base for all
    train_steps: int = 100  # per row and seed
    batch: int = 16
    n_test: int = 200
    eval_batch: int = 100
    max_new_tokens: int = 16
    # Our rows' learning rates are chosen from lr_grid (accuracy.select_rates), after select_steps steps at each;
    # full fine-tuning trains at full_lr.
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 5e-2, 3e-1)
    select_steps: int = 30
    full_lr: float = 1e-4
    profile_steps: int = 10  # `--profile`: profiled train steps per row
    seed: int = 0  # the base's: its random init and its pretraining corpus

    def pretrain_key(self) -> str:
        """The cache key: everything the pretrained base depends on."""
        keys = ("hidden", "layers", "intermediate", "heads", "kv_heads", "pretrain_steps", "pretrain_batch")
        spec = {k: getattr(self, k) for k in (*keys, "pretrain_lr", "seed")}
        spec |= {"vocab": task.Tokenizer().vocab, "corpus": CORPUS_VERSION, "max_number": task.MAX_NUMBER}
        spec |= {"answered_every": task.ANSWERED_EVERY}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT = Settings()
QUICK = replace(
    DEFAULT,
    hidden=64,
    layers=2,
    intermediate=128,
    pretrain_steps=800,
    pretrain_batch=32,
    pretrain_lr=3e-3,
    train_steps=60,
    batch=8,
    n_test=96,
    eval_batch=96,
    profile_steps=3,
    lr_grid=(3e-3, 5e-2),
    select_steps=10,
)
