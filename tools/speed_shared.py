"""Train-step time of the shared-tensor specs (VeRA, VB-LoRA, RandLoRA) against PEFT 0.21's same methods.

Qwen3-0.6B-sized layers in one model (v_proj 1024 -> 1024, q_proj 1024 -> 2048, down_proj 3072 -> 1024), so the
shared tensors are sized by the largest target and sliced, as in a real attach. One torch thread; each repeat
times one forward + backward of ours and of PEFT's, interleaved; prints the median ratio ours / PEFT. With
--each, also each layer alone (a model of that one layer: the shared tensors sized by it).

    OMP_NUM_THREADS=1 .venv/bin/python tools/speed_shared.py [--tokens 256] [--repeats 15] [--each]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import RandLoraConfig, VBLoRAConfig, VeraConfig, get_peft_model
from torch import nn

import lora_lite as ll

LAYERS = {"v_proj": (1024, 1024), "q_proj": (1024, 2048), "down_proj": (3072, 1024)}
METHODS = {
    "VeRA r=256": (lambda t: ll.VeRAConfig(r=256, target_names=t), lambda t: VeraConfig(r=256, target_modules=t)),
    "VB-LoRA r=4 n=256 b=256 k=2": (
        lambda t: ll.VBLoRAConfig(target_names=t),
        lambda t: VBLoRAConfig(r=4, num_vectors=256, vector_length=256, topk=2, target_modules=t),
    ),
    "RandLoRA r=32 (PEFT's default)": (
        lambda t: ll.RandLoRAConfig(r=32, alpha=640, target_names=t),
        lambda t: RandLoraConfig(r=32, randlora_alpha=640, target_modules=t),
    ),
}


class Block(nn.Module):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(*LAYERS[name], bias=False))

    def forward(self, xs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self, name)(x).square().mean() for name, x in xs.items())


def step(model: nn.Module, xs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(xs).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--each", action="store_true", help="also time each layer alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(args.tokens, d_in, generator=gen) for name, (d_in, _) in LAYERS.items()}
    groups = [list(LAYERS)] + ([[name] for name in LAYERS] if args.each else [])
    median = f"median of {args.repeats}, {args.tokens} tokens, 1 thread"
    print(f"| method | layers | ours / PEFT ({median}) | ours ms | PEFT ms |")
    print("|---|---|---|---|---|")
    for title, (ours_cfg, peft_cfg) in METHODS.items():
        for names in groups:
            xs = {name: inputs[name] for name in names}
            torch.manual_seed(0)
            ours = Block(names)
            ll.attach(ours, ours_cfg("|".join(names)))
            theirs = get_peft_model(Block(names), peft_cfg(names))
            for model in (ours, theirs):  # warm up
                step(model, xs)
            mine, peft = [], []
            for _ in range(args.repeats):
                mine.append(step(ours, xs))
                peft.append(step(theirs, xs))
            ratio = statistics.median(a / b for a, b in zip(mine, peft, strict=True))
            ms = statistics.median(mine) * 1e3, statistics.median(peft) * 1e3
            shapes = ", ".join(f"{LAYERS[n][0]} -> {LAYERS[n][1]}" for n in names)
            print(f"| {title} | {shapes} | {ratio:.3f}x | {ms[0]:.1f} | {ms[1]:.1f} |")


if __name__ == "__main__":
    main()
