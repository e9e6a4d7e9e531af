"""Train-step time of our SHiRA against PEFT 0.21's, one layer at a time on Qwen3-0.6B's layer shapes (1024 -> 1024,
1024 -> 2048, 3072 -> 1024), batch 2 x 128 tokens, float32, one thread, PEFT's default r = 32.

A step is forward + backward of one adapted nn.Linear (with a bias) whose input requires grad (a layer inside a
model). Ours and PEFT's are built from the same layer with the same positions (PEFT's shira_indices copied into our
idx) and the same random non-zero values, and take their steps alternately on the same input; the printed ratio is
the median over the repeats of ours over PEFT's same step (ratios only: absolute times depend on the machine).
PEFT adds its sparse update to a copy of W and runs one dense F.linear, so its backward forms the dense
[d_out, d_in] weight gradient; ours applies the sparse update as a sparse-times-dense product (`sparse` in the
spec language) beside the frozen layer. Run: `OMP_NUM_THREADS=1 python tools/shira_speed.py [r ...]`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from peft import ShiraConfig, get_peft_model
from torch import nn

import lora_lite as ll

SHAPES = [(1024, 1024), (1024, 2048), (3072, 1024)]
REPEATS, WARMUP = 30, 3


def _pair(r: int, d_in: int, d_out: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d_in, d_out))
    ours, theirs = nn.Sequential(), nn.Sequential()
    ours.add_module("proj", nn.Linear(d_in, d_out))
    theirs.add_module("proj", nn.Linear(d_in, d_out))
    ours.load_state_dict(base.state_dict())
    theirs.load_state_dict(base.state_dict())
    ll.attach(ours, ll.SHiRAConfig(r=r, target_names="proj"))
    theirs = get_peft_model(theirs, ShiraConfig(r=r, target_modules=["proj"]), autocast_adapter_dtype=False)
    layer = theirs.get_submodule("base_model.model.proj")
    with torch.no_grad():
        rows, cols = layer.shira_indices["default"].long()
        ours.proj.lora_idx.copy_(rows * d_in + cols)
        ours.proj.lora_weight.copy_(0.01 * torch.randn(ours.proj.lora_weight.shape))
        layer.shira_weight["default"].copy_(ours.proj.lora_weight)
    return ours, theirs


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor) -> float:
    start = time.perf_counter()
    x = x.detach().requires_grad_(True)
    (model(x) * w).sum().backward()
    return time.perf_counter() - start


def main() -> int:
    ranks = [int(a) for a in sys.argv[1:]] or [32]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, batch 2 x 128, float32, one thread, median of {REPEATS}")
    print("| method | layer | ours / PEFT (train step) |")
    print("|---|---|---:|")
    for r in ranks:
        for d_in, d_out in SHAPES:
            ours, theirs = _pair(r, d_in, d_out)
            x = torch.randn(2, 128, d_in)
            w = torch.randn(2, 128, d_out)
            ratios = []
            for i in range(WARMUP + REPEATS):
                first, second = (ours, theirs) if i % 2 == 0 else (theirs, ours)
                a, b = _step(first, x, w), _step(second, x, w)
                mine, peft_time = (a, b) if first is ours else (b, a)
                if i >= WARMUP:
                    ratios.append(mine / peft_time)
            print(f"| SHiRA r={r} | {d_in} -> {d_out} | {statistics.median(ratios):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
