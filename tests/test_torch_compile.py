"""torch.compile of an attached model gives the eager outputs and gradients, for every variant.

Every variant compiles with fullgraph=True (no graph break in the hooks). The all-variant test uses the
aot_eager backend (dynamo tracing and AOT autograd, the parts that see our hooks, without inductor's code
generation): inductor compiles C++ kernels with gcc, about 20 s per variant cold on a CI CPU, so one
inductor test runs LoRA end to end.
"""

from __future__ import annotations

import pytest
import torch
from test_variants import CASES, attach, case_of, setup, trainable

from lora_lite import verify

VARIANTS = sorted(case for case in CASES if case.endswith("-mlp") and not case.startswith("handwritten"))


def eager_and_compiled(case: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    m, cfg = setup(case)
    attach(m, cfg)
    with torch.no_grad():  # off the identity, so that every term of the forward counts
        for param in trainable(m.module).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    eager = m.out()
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in trainable(m.module).items()}
    m.module.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(m.module, backend=backend, fullgraph=True)(m.inputs)
    compiled.square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in trainable(m.module).items()}
    return eager, compiled, eager_grads, compiled_grads


@pytest.mark.parametrize("case", VARIANTS)
def test_compiled_model_matches_eager(case: str) -> None:
    verify.compiles_fullgraph(case_of(case), backend="aot_eager")  # the check `lora-lite verify` runs


def test_inductor_compiled_lora_matches_eager() -> None:
    eager, compiled, eager_grads, compiled_grads = eager_and_compiled("lora-mlp", "inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
