"""Tiny models for the tests: built offline from configs with random weights."""

from __future__ import annotations

import atexit
import collections
import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

# torch.compile's inductor caches compiled kernels in /tmp/torchinductor_$USER, shared by every process on the
# machine: one written under other CPU settings (ATEN_CPU_CAPABILITY below) or by a crashed run segfaulted the
# inductor test. The tests compile into a fresh folder of their own, unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora-lite-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
# The compiler's cache (parser tables, templates, compiled modules) likewise: the suite compiles every spec at
# least once instead of reading what an earlier run of another checkout stored in ~/.cache/lora-lite.
if "LORA_LITE_CACHE" not in os.environ:
    os.environ["LORA_LITE_CACHE"] = tempfile.mkdtemp(prefix="lora-lite-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["LORA_LITE_CACHE"], ignore_errors=True)

import pytest
import torch
from torch import nn

from lora_lite.peft_records import peft_tensor  # noqa: F401 (the tests' one lookup of a PEFT tensor)
from lora_lite.tiny import qwen3, qwen3_config
from lora_lite.verify import TinyMLP

VOCAB = 96
COUNTS: collections.Counter[str] = collections.Counter()  # cases run by the fuzz and fault tests, in the summary

# The test models are tiny: one thread is fastest, and on a loaded machine several
# OpenMP threads spinning against each other make bitsandbytes' CPU kernels ~10x slower.
torch.set_num_threads(1)

# LORA_LITE_TEST_HIDE_AVX512BF16=1 runs the suite as on a CPU without AVX512-BF16 (the kind where
# bitsandbytes never repacks 4-bit weights): bitsandbytes' own probe answers False. Combine with
# ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 to keep torch's kernels off AVX512 too.
if os.environ.get("LORA_LITE_TEST_HIDE_AVX512BF16") == "1":
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def build_qwen(bias: bool = False, intermediate_size: int = 96) -> nn.Module:
    """A 2-layer Qwen3 with random weights (seed 0), built fresh on every call."""
    # head_dim 32: q_proj 64 -> 128, k/v 64 -> 64, o_proj 128 -> 64: d_in != d_out
    config = qwen3_config(VOCAB, 64, intermediate_size, head_dim=32, attention_bias=bias, tie_word_embeddings=False)
    return qwen3(config, seed=0)


@functools.cache
def _qwen(bias: bool) -> nn.Module:
    return build_qwen(bias)


def tiny_qwen(bias: bool = True) -> nn.Module:
    """A 2-layer Qwen3 with random weights; every call returns a fresh copy of the same model."""
    return copy.deepcopy(_qwen(bias))


def tiny_mlp() -> nn.Module:
    """The MLP `lora-lite verify` uses (up 12 -> 20 with a bias, down 20 -> 8 without), seeded, in eval mode."""
    return TinyMLP().eval()


def import_spec(source: str, tmp_path: Path, name: str) -> ModuleType:
    """Compile a spec's source into `tmp_path` and import the module (registering its variant)."""
    from lora_lite.compiler import compile_source

    path = tmp_path / f"{name}.py"
    path.write_text(compile_source(source, f"{name}.adapter"))
    spec = importlib.util.spec_from_file_location(f"lora_lite_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The parity tests' models: name -> (build, its targets, an input). tiny_mlp's up (12 -> 20, bias) and down
# (20 -> 8, no bias) on [2, 5, 12]; tiny_qwen's q_proj (64 -> 128, bias) and v_proj (64 -> 64, bias) on token
# ids [2, 7].
PARITY_MODELS = {
    "mlp": (
        lambda: tiny_mlp(),
        ["up", "down"],
        lambda: torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5)),
    ),
    "qwen": (
        lambda: tiny_qwen(),
        ["q_proj", "v_proj"],
        lambda: torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6)),
    ),
}


def run_both(
    ours: nn.Module, theirs: nn.Module, x: torch.Tensor, dtype: torch.dtype, training: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our model's and PEFT's outputs on x (floating inputs cast to dtype), logits where a model returns them, as
    float32, after backward of the same seeded random weighting of each: the adapter tensors of both sides then
    hold the gradients the parity tests compare. Both run in train mode (as training runs; `training=False`:
    eval mode), torch's RNG seeded alike before each forward, so that a training-time builtin (dropout, PVeRA's
    sample) draws alike on both sides."""
    x = x.to(dtype) if x.is_floating_point() else x
    ours.train(training), theirs.train(training)
    torch.manual_seed(0)
    out_ours = ours(x)
    torch.manual_seed(0)
    out_peft = theirs(x)
    out_ours, out_peft = getattr(out_ours, "logits", out_ours).float(), getattr(out_peft, "logits", out_peft).float()
    weight = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(4))
    (out_ours * weight).sum().backward()
    (out_peft * weight).sum().backward()
    return out_ours, out_peft


def within_scale(ours: torch.Tensor, peft: torch.Tensor, tol: float, what: str) -> tuple[float, float]:
    """max |ours - PEFT's| and PEFT's scale max |PEFT's| over all entries (float32, flattened); asserts the scale
    is not zero and the difference at most tol of it (`what` names the values in the message)."""
    a, b = ours.detach().float().reshape(-1), peft.detach().float().reshape(-1)
    scale = b.abs().max().item()
    assert scale > 0, f"{what}: PEFT's is zero"
    diff = (a - b).abs().max().item()
    assert diff <= tol * scale, f"{what} differs by {diff} (scale {scale})"
    return diff, scale


def assert_parity(
    label: str,
    outputs: tuple[torch.Tensor, torch.Tensor],
    grads: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    tol: float,
    dtype: torch.dtype,
    grad_tol: float | None = None,
    what: str = "",
) -> None:
    """The parity tests' check and row: our output within `tol` of PEFT's scale (`outputs`: ours, PEFT's), and
    each (key, our gradient, PEFT's gradient in our layout) within `grad_tol` (tol if None) of its own; `what`
    prefixes the failure messages. `pytest -s` prints the row
    `| label | fwd diff (over its scale) | worst gradient diff (over its scale) | dtype |`."""
    fwd, scale = within_scale(*outputs, tol, f"{what}forward")
    worst, worst_abs = 0.0, 0.0
    for key, ours, peft in grads:
        diff, g_scale = within_scale(ours, peft, tol if grad_tol is None else grad_tol, f"{what}gradient of {key}")
        worst, worst_abs = max(worst, diff / g_scale), max(worst_abs, diff)
    print(f"\n| {label} | {fwd:.1e} ({fwd / scale:.1e}) | {worst_abs:.1e} ({worst:.1e}) | {dtype} |")


@pytest.fixture
def qwen() -> nn.Module:
    return tiny_qwen()


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


def pytest_terminal_summary(terminalreporter) -> None:
    for key, value in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{key}: {value}")
