"""Train-step time (forward + backward) of our RoAd and TinyLoRA specs against PEFT 0.21's, as ratios.

One torch thread; Qwen3-0.6B-sized layers (1024 -> 1024, 1024 -> 2048, 3072 -> 1024) on 2 x 256 tokens whose
input needs a gradient (as inside a model). Ours and PEFT's run interleaved, `--repeats` rounds; each side's
median is compared: ratio = ours / PEFT (below 1: ours is faster).

    OMP_NUM_THREADS=1 .venv/bin/python tools/speed_vs_peft_road.py [--repeats 9] [--only road,tinylora]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import RoadConfig, TinyLoraConfig, get_peft_model
from torch import nn

import lora_lite as ll

SHAPES = [(1024, 1024), (1024, 2048), (3072, 1024)]
TOKENS = (2, 256)


class One(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def methods() -> dict[str, tuple]:
    """name -> (our config, PEFT config)"""
    return {
        "road": (ll.RoAdConfig(target_names="proj"), RoadConfig(variant="road_1", target_modules=["proj"])),
        "road_2": (ll.RoAd2Config(target_names="proj"), RoadConfig(variant="road_2", target_modules=["proj"])),
        "road_4": (ll.RoAd4Config(target_names="proj"), RoadConfig(variant="road_4", target_modules=["proj"])),
        "tinylora": (ll.TinyLoRAConfig(target_names="proj"), TinyLoraConfig(target_modules=["proj"])),
    }


def step_time(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    x.grad = None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = [m for m in methods() if not args.only or m in args.only.split(",")]
    print(f"| method | layer | ours / PEFT (train step, median of {args.repeats}) |")
    print("|---|---|---|")
    for name in chosen:
        ours_cfg, peft_cfg = methods()[name]
        for d_in, d_out in SHAPES:
            torch.manual_seed(0)
            ours, base = One(d_in, d_out), One(d_in, d_out)
            base.load_state_dict(ours.state_dict())
            ll.attach(ours, ours_cfg)
            theirs = get_peft_model(base, peft_cfg, autocast_adapter_dtype=False)
            x = torch.randn(*TOKENS, d_in, requires_grad=True)
            for model in (ours, theirs):  # warm up
                step_time(model, x)
            times: dict[str, list[float]] = {"ours": [], "peft": []}
            for _ in range(args.repeats):
                times["ours"].append(step_time(ours, x))
                times["peft"].append(step_time(theirs, x))
            ratio = statistics.median(times["ours"]) / statistics.median(times["peft"])
            print(f"| {name} | {d_in} -> {d_out} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
