"""Train-step time of the spectral specs (C3A, FourierFT, WaveFT) against PEFT 0.21's same method, one layer at a
time on Qwen3-0.6B's layer shapes (1024 -> 1024, 1024 -> 2048, 3072 -> 1024), batch 2 x 64 tokens, float32, one thread.

A step is forward + backward of one adapted nn.Linear whose input requires grad (a layer inside a model). Ours and
PEFT's are built from the same layer with the same adapter values and take their steps alternately; the printed
ratio is the median over the repeats of ours over PEFT's same step (ratios only: absolute times depend on the
machine). Run: `OMP_NUM_THREADS=1 python tools/spectral_speed.py` (CPU); `python tools/spectral_speed.py cuda` times
the same steps on a GPU (synchronised before and after each step).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from peft import C3AConfig, FourierFTConfig, WaveFTConfig, get_peft_model
from torch import nn

import lora_lite as ll

SHAPES = [(1024, 1024), (1024, 2048), (3072, 1024)]
REPEATS, WARMUP = 30, 3


def _methods() -> dict:
    """name -> (our config, PEFT config, {our slot: PEFT attribute})."""
    return {
        "C3A b=64": (ll.C3AConfig(b=64, target_names="proj"), C3AConfig(block_size=64), {"K": "c3a_kernel"}),
        "C3A b=256": (ll.C3AConfig(b=256, target_names="proj"), C3AConfig(block_size=256), {"K": "c3a_kernel"}),
        "FourierFT n=1000": (
            ll.FourierFTConfig(n_frequency=1000, target_names="proj"),
            FourierFTConfig(n_frequency=1000),
            {"spectrum": "fourierft_spectrum"},
        ),
        "WaveFT n=2592": (
            ll.WaveFTConfig(n_frequency=2592, target_names="proj"),
            WaveFTConfig(n_frequency=2592),
            {"spectrum": "waveft_spectrum"},
        ),
    }


def _pair(cfg, peft_cfg, mapping, d_in: int, d_out: int, device: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(d_in, d_out))
    ours, theirs = nn.Sequential(), nn.Sequential()
    ours.add_module("proj", nn.Linear(d_in, d_out))
    theirs.add_module("proj", nn.Linear(d_in, d_out))
    ours.load_state_dict(base.state_dict())
    theirs.load_state_dict(base.state_dict())
    ours.to(device)
    theirs.to(device)
    ll.attach(ours, cfg)
    peft_cfg.target_modules = ["proj"]
    theirs = get_peft_model(theirs, peft_cfg, autocast_adapter_dtype=False)
    layer = theirs.get_submodule("base_model.model.proj")
    with torch.no_grad():
        for slot, attribute in mapping.items():
            mine = getattr(ours.proj, f"lora_{slot}")
            mine.copy_(0.01 * torch.randn(mine.shape, device=mine.device))
            getattr(layer, attribute)["default"].copy_(mine)
    return ours, theirs


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    x = x.detach().requires_grad_(True)
    (model(x) * w).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} on {device}, batch 2 x 64, float32, median of {REPEATS}")
    print("| method | layer | ours / PEFT (train step) |")
    print("|---|---|---:|")
    for name, (cfg, peft_cfg, mapping) in _methods().items():
        for d_in, d_out in SHAPES:
            ours, theirs = _pair(cfg, peft_cfg, mapping, d_in, d_out, device)
            x = torch.randn(2, 64, d_in, device=device)
            w = torch.randn(2, 64, d_out, device=device)
            ratios = []
            for i in range(WARMUP + REPEATS):
                first, second = (ours, theirs) if i % 2 == 0 else (theirs, ours)
                a, b = _step(first, x, w), _step(second, x, w)
                mine, peft_time = (a, b) if first is ours else (b, a)
                if i >= WARMUP:
                    ratios.append(mine / peft_time)
            print(f"| {name} | {d_in} -> {d_out} | {statistics.median(ratios):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
