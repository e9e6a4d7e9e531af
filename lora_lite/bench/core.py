"""The training and evaluation core both benchmarks share.

An example is a prompt and a target, each a list of token ids. Training batches
are right-padded, with the loss on the target tokens only; evaluation generates
greedily from left-padded prompts and scores the answer extracted from the text
by exact match, as GSM8K is scored.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch
from torch import Tensor, nn

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    target: list[int]  # the answer's tokens, ending with the end-of-sequence token
    answer: str  # the reference answer (a number, as text)


def train_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on the prompt and the padding)."""
    length = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt + e.target
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(e.prompt) : len(seq)] = torch.tensor(e.target)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].reshape(-1).to(device)
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE
    )


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], clip: float | None = None
) -> float:
    """One optimizer step (gradients clipped to norm `clip` if given); returns the loss."""
    loss = loss_of(model, batch)
    loss.backward()
    if clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, pad_id: int, eos_id: int) -> list:
    """Greedy continuations (token ids, cut at the first end token) of left-padded prompts."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    continuations = []
    for row in out[:, length:].tolist():
        continuations.append(row[: row.index(eos_id)] if eos_id in row else row)
    return continuations


_HASH = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def extract_answer(text: str) -> str | None:
    """The answer in a GSM8K-style text: the number after `####`, else the last number; normalised.

    "... #### 72" -> "72"; "The answer is $1,234.50" -> "1234.5"; "-3" -> "-3"; no number -> None.
    """
    match = _HASH.search(text)
    found = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    return None if found is None else normalize_number(found)


def normalize_number(text: str) -> str | None:
    """A number as a canonical string: no `$`, no thousands commas, no trailing zeros ("4.50" -> "4.5")."""
    cleaned = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def accuracy(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Exact match of extracted answers, in [0, 1]."""
    refs = [normalize_number(r) for r in references]
    return sum(p is not None and p == r for p, r in zip(predictions, refs, strict=True)) / max(len(refs), 1)


def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    decode: Callable[[list[int]], str],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[float, list[str], float]:
    """Greedy generation on every example; (accuracy, generated texts, seconds)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    texts = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        texts += [decode(c) for c in generate(model, [e.prompt for e in chunk], max_new_tokens, pad_id, eos_id)]
    seconds = time.perf_counter() - start
    model.train(was_training)
    return accuracy([extract_answer(t) for t in texts], [e.answer for e in examples]), texts, seconds


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def profiled_peak(step: Callable[[], object]) -> tuple[object, int]:
    """Run `step` under torch.profiler with memory tracking; (its result, peak bytes allocated during it).

    The CPU allocator has no max_memory_allocated, so the peak is the running sum,
    in time order, of each profiled op's own allocations minus its frees:
    activations, gradients and optimizer state created by the step.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        result = step()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage + e.self_device_memory_usage
        peak = max(peak, live)
    return result, peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler backend's start/stop lines, which it writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
