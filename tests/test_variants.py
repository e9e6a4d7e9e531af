"""One table of variants crossed with the shared checks every variant must pass.

A new spec gets every check by adding one row to CASES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, tiny_mlp, tiny_qwen
from torch import Tensor, nn

import lora_lite as ll
from lora_lite.variant import AdapterConfig, Slot, Variant


@dataclass(kw_only=True)
class OutBiasConfig(AdapterConfig):
    """A hand-written variant: a trainable bias added to the layer output (BitFit-like)."""

    scale: float = 1.0


class OutBias(Variant):
    """Hand-written, not compiled: the runtime must treat it exactly like generated code."""

    name = "test_out_bias"
    title = "OutBias"
    config_class = OutBiasConfig
    site = "output"
    quantizable = True
    init_reads_weight = False

    @staticmethod
    def slots(cfg: OutBiasConfig, d_in: int, d_out: int) -> list[Slot]:
        return [Slot("b", (d_out,), trainable=True)]

    @staticmethod
    def init(
        cfg: OutBiasConfig, d_in: int, d_out: int, W: Tensor | None, stats: dict, device: torch.device
    ) -> dict[str, Tensor]:
        return {"b": torch.zeros(d_out, device=device)}

    @staticmethod
    def output(layer: nn.Module, cfg: OutBiasConfig, x: Tensor, y: Tensor) -> Tensor:
        return y + cfg.scale * layer.lora_b.to(x.dtype)


@dataclass
class Model:
    """A model, an input for it, and a loss on its output."""

    module: nn.Module
    inputs: Tensor

    def out(self) -> Tensor:
        result = self.module(self.inputs)
        return result.logits if hasattr(result, "logits") else result

    def calibration(self) -> list[Tensor]:
        """A few batches shaped like the inputs, for variants that calibrate."""
        g = torch.Generator().manual_seed(4)
        if self.inputs.dtype == torch.long:
            return [torch.randint(0, VOCAB, self.inputs.shape, generator=g) for _ in range(3)]
        return [torch.randn(self.inputs.shape, generator=g) for _ in range(3)]

    def loss(self) -> Tensor:
        if hasattr(self.module, "config"):
            return self.module(self.inputs, labels=self.inputs).loss
        target = torch.linspace(-1, 1, self.out().shape[-1])
        return ((self.out() - target) ** 2).mean()


def qwen_model() -> Model:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    return Model(tiny_qwen(), ids)


def mlp_model() -> Model:
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    return Model(tiny_mlp(), x)


ALL = {"target_names": None}
CASES: dict[str, tuple[Callable[..., AdapterConfig], Callable[[], Model], dict]] = {
    "lora-qwen": (lambda **kw: ll.LoRAConfig(r=4, **kw), qwen_model, {}),
    "lora-mlp": (lambda **kw: ll.LoRAConfig(r=4, **kw), mlp_model, ALL),
    "pissa-qwen": (lambda **kw: ll.PiSSAConfig(r=4, **kw), qwen_model, {}),
    "pissa-mlp": (lambda **kw: ll.PiSSAConfig(r=4, **kw), mlp_model, ALL),
    "dora-qwen": (lambda **kw: ll.DoRAConfig(r=4, **kw), qwen_model, {}),
    "dora-mlp": (lambda **kw: ll.DoRAConfig(r=4, **kw), mlp_model, ALL),
    "ia3-qwen": (lambda **kw: ll.IA3Config(**kw), qwen_model, {}),
    "ia3-mlp": (lambda **kw: ll.IA3Config(**kw), mlp_model, ALL),
    "ia3ff-qwen": (lambda **kw: ll.IA3FFConfig(**kw), qwen_model, {}),
    "ia3ff-mlp": (lambda **kw: ll.IA3FFConfig(**kw), mlp_model, ALL),
    "delora-qwen": (lambda **kw: ll.DeLoRAConfig(r=4, **kw), qwen_model, {}),
    "delora-mlp": (lambda **kw: ll.DeLoRAConfig(r=4, **kw), mlp_model, ALL),
    "hra-qwen": (lambda **kw: ll.HRAConfig(r=4, **kw), qwen_model, {}),
    "hra-mlp": (lambda **kw: ll.HRAConfig(r=4, **kw), mlp_model, ALL),
    "eva-qwen": (lambda **kw: ll.EVAConfig(r=4, **kw), qwen_model, {}),
    "eva-mlp": (lambda **kw: ll.EVAConfig(r=4, **kw), mlp_model, ALL),
    "antipasto-qwen": (lambda **kw: ll.AntiPaSTOConfig(r=8, **kw), qwen_model, {}),
    "antipasto-mlp": (lambda **kw: ll.AntiPaSTOConfig(r=4, **kw), mlp_model, ALL),
    "corda-qwen": (lambda **kw: ll.AntiPaSTOCorDAConfig(r=8, **kw), qwen_model, {}),
    "corda-mlp": (lambda **kw: ll.AntiPaSTOCorDAConfig(r=4, **kw), mlp_model, ALL),
    "ablate-qwen": (lambda **kw: ll.AntiPaSTOAblateConfig(r=8, **kw), qwen_model, {}),
    "ablate-mlp": (lambda **kw: ll.AntiPaSTOAblateConfig(r=4, **kw), mlp_model, ALL),
    "arrow-qwen": (lambda **kw: ll.AntiPaSTOArrowConfig(r=8, k=4, **kw), qwen_model, {}),
    "arrow-mlp": (lambda **kw: ll.AntiPaSTOArrowConfig(r=4, k=2, **kw), mlp_model, ALL),
    "handwritten-mlp": (lambda **kw: OutBiasConfig(**kw), mlp_model, ALL),
}


def setup(case: str, dtype: torch.dtype = torch.float32) -> tuple[Model, AdapterConfig]:
    make_cfg, make_model, extra = CASES[case]
    return make_model(), make_cfg(dtype=dtype, **extra)


def attach(m: Model, cfg: AdapterConfig) -> list[str]:
    """Attach, with calibration batches for the variants that need them."""
    data = m.calibration() if Variant.for_config(cfg).stats else None
    return ll.attach(m.module, cfg, calibration_data=data)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(m: Model, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(trainable(m.module).values(), lr=lr)
    for _ in range(steps):
        m.loss().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


def test_identity_at_init(case: str) -> None:
    m, cfg = setup(case)
    with torch.no_grad():
        base = m.out()
        attach(m, cfg)
        adapted = m.out()
    assert (adapted - base).abs().max().item() <= 1e-6


def test_gradients_reach_only_adapter_params(case: str) -> None:
    m, cfg = setup(case)
    attach(m, cfg)
    with torch.no_grad():  # move zero-initialised factors off zero (and into clamps' ranges): every grad is non-zero
        for param in trainable(m.module).values():
            param.add_(0.05 * torch.rand_like(param))
    m.loss().backward()
    params = dict(m.module.named_parameters())
    adapter = {n for n in params if n.rsplit(".", 1)[-1].startswith("lora_")}
    assert adapter and set(trainable(m.module)) == adapter
    for name, param in params.items():
        if name in adapter:
            assert param.grad is not None and param.grad.abs().max() > 0, name
        else:
            assert param.grad is None, name


def test_training_changes_output(case: str) -> None:
    m, cfg = setup(case)
    attach(m, cfg)
    with torch.no_grad():
        before = m.out()
    train(m, steps=3, lr=1e-2)
    with torch.no_grad():
        assert (m.out() - before).abs().max() > 1e-4


def test_save_then_load_into_fresh_model(case: str, tmp_path) -> None:
    m, cfg = setup(case)
    attach(m, cfg)
    train(m, steps=3, lr=1e-2)
    with torch.no_grad():
        trained = m.out()
    ll.save(m.module, tmp_path / "adapter.safetensors")
    fresh, _ = setup(case)
    ll.load(fresh.module, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.out(), trained)
    assert set(trainable(fresh.module)) == set(trainable(m.module))


def test_detach_restores_base_bit_for_bit(case: str) -> None:
    m, cfg = setup(case)
    state = {k: v.clone() for k, v in m.module.state_dict().items()}
    flags = {n: p.requires_grad for n, p in m.module.named_parameters()}
    with torch.no_grad():
        base = m.out()
    attach(m, cfg)
    train(m, steps=2, lr=1e-2)
    ll.detach(m.module)
    with torch.no_grad():
        assert torch.equal(m.out(), base)
    after = m.module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in m.module.named_parameters()} == flags
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.module.modules())


# The seed's learning rates: IA3, IA3-FF and the AntiPaSTO family 5e-3, DeLoRA 1e-3, the others 1e-4.
SEED_LR = {"ia3": 5e-3, "ia3ff": 5e-3, "antipasto": 5e-3, "corda": 5e-3, "ablate": 5e-3, "arrow": 5e-3}
SEED_LR |= {"delora": 1e-3}


def test_bf16_adapter_every_param_moves_at_the_seed_learning_rate(case: str) -> None:
    m, cfg = setup(case, dtype=torch.bfloat16)
    attach(m, cfg)
    params = trainable(m.module)
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    train(m, steps=3, lr=SEED_LR.get(case.split("-")[0], 1e-4))  # a plain AdamW, as the seed trains
    for name, param in params.items():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move in bf16: its updates round away"


def moved_fraction(dtype: torch.dtype) -> float:
    """LoRA on a bf16 Qwen, 3 AdamW steps at lr 1e-4: the fraction of A's entries that changed."""
    m = qwen_model()
    m.module.to(torch.bfloat16)
    attach(m, ll.LoRAConfig(r=4, dtype=dtype))
    A = {n: p.detach().clone() for n, p in trainable(m.module).items() if n.endswith("lora_A")}
    train(m, steps=3, lr=1e-4)
    params = trainable(m.module)
    return sum((params[n].detach() != a).sum().item() for n, a in A.items()) / sum(a.numel() for a in A.values())


def test_float32_adapter_is_the_master_copy_for_a_bf16_model() -> None:
    """README (Dtypes): in bf16 most of A's entries stay put at lr 1e-4; a float32 adapter moves them all."""
    assert moved_fraction(torch.bfloat16) < 0.5
    assert moved_fraction(torch.float32) == 1.0


def test_trainable_count_matches_slots(case: str) -> None:
    m, cfg = setup(case)
    names = attach(m, cfg)
    variant = Variant.for_config(cfg)
    expected = sum(
        variant.num_trainable(cfg, layer.in_features, layer.out_features)
        for layer in (m.module.get_submodule(n) for n in names)
    )
    assert sum(p.numel() for p in trainable(m.module).values()) == expected
