"""`lora-lite demo`: every variant trained, saved, detached and loaded on an embedded tiny model.

The model is a 2-layer Qwen3 built in process from a config with seeded random
weights (init std 0.1, no hub access). The task is reversing 6 digits,
`BOS d1..d6 SEP d6..d1`, with the loss on the reversed half only; the random
base cannot do it. Each variant is attached with its default targets and checked:

    identity   the adapted model's logits equal the base's at init (max abs diff); for a spec whose
               docstring says "Identity at init: no" (VB-LoRA), they differ, as it says
    learns     `steps` AdamW steps lower the loss on held-out sequences
    save/load  after save, detach and load, the logits equal those before save, bit for bit
    detach     after each detach the base's state_dict, logits and requires_grad flags are back
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import lora_lite as ll

DIGITS, SEP, BOS, VOCAB = 10, 10, 11, 16
LENGTH = 6  # digits to reverse
BATCH = 32
IDENTITY_TOL = 1e-4  # max abs logit diff at init; float rounding allowed (PiSSA's W_res + B A)
SEED = 0


@dataclass
class Case:
    name: str
    config: Callable[[], ll.AdapterConfig]
    lr: float


CASES = [
    Case("LoRA", lambda: ll.LoRAConfig(), 1e-3),
    Case("PiSSA", lambda: ll.PiSSAConfig(), 1e-3),
    Case("DoRA", lambda: ll.DoRAConfig(), 1e-3),
    Case("IA3", lambda: ll.IA3Config(), 5e-3),
    Case("IA3-FF", lambda: ll.IA3FFConfig(), 5e-3),
    Case("DeLoRA", lambda: ll.DeLoRAConfig(), 1e-3),
    Case("HRA", lambda: ll.HRAConfig(), 1e-3),
    Case("EVA", lambda: ll.EVAConfig(), 1e-3),
    Case("AntiPaSTO", lambda: ll.AntiPaSTOConfig(r=16), 5e-3),
    Case("AntiPaSTO-CorDA", lambda: ll.AntiPaSTOCorDAConfig(r=16), 5e-3),
    Case("AntiPaSTO-ablate", lambda: ll.AntiPaSTOAblateConfig(r=16), 5e-3),
    Case("AntiPaSTO-arrow", lambda: ll.AntiPaSTOArrowConfig(r=16), 5e-3),
    Case("RSLoRA", lambda: ll.RSLoRAConfig(), 1e-3),
    Case("LoRA-FA", lambda: ll.LoRAFAConfig(), 1e-3),
    Case("VeRA", lambda: ll.VeRAConfig(r=16), 5e-3),
    Case("VB-LoRA", lambda: ll.VBLoRAConfig(num_vectors=64, vector_length=16), 5e-3),
    Case("PVeRA", lambda: ll.PVeRAConfig(r=16), 5e-3),
    Case("LoHa", lambda: ll.LoHaConfig(), 1e-3),
    Case("AdaLoRA", lambda: ll.AdaLoRAConfig(), 5e-3),
    Case("RSDoRA", lambda: ll.RSDoRAConfig(), 1e-3),
    Case("HiRA", lambda: ll.HiRAConfig(r=8), 1e-3),
    Case("BEFT", lambda: ll.BEFTConfig(), 5e-3),
    Case("OFT", lambda: ll.OFTConfig(), 5e-3),
    Case("OFT-Cayley", lambda: ll.OFTCayleyConfig(), 5e-3),
    Case("PSOFT", lambda: ll.PSOFTConfig(), 5e-3),
    Case("GLoRA", lambda: ll.GLoRAConfig(), 1e-3),
    Case("DEFT", lambda: ll.DEFTConfig(), 1e-3),
    Case("PEANuT", lambda: ll.PEANuTConfig(), 1e-3),
    Case("RoAd", lambda: ll.RoAdConfig(), 5e-3),
    Case("RoAd-2", lambda: ll.RoAd2Config(), 5e-3),
    Case("RoAd-4", lambda: ll.RoAd4Config(), 5e-3),
    Case("TinyLoRA", lambda: ll.TinyLoRAConfig(), 5e-3),
    Case("BOFT", lambda: ll.BOFTConfig(), 5e-3),
    Case("C3A", lambda: ll.C3AConfig(b=16), 5e-2),  # the update is scaled by 1 / d_in: a large rate, as C3A uses
    Case("FourierFT", lambda: ll.FourierFTConfig(), 5e-3),
    Case("WaveFT", lambda: ll.WaveFTConfig(), 1e-3),
    Case("RandLoRA", lambda: ll.RandLoRAConfig(r=16), 1e-3),
    Case("LoKr", lambda: ll.LoKrConfig(r=4, f=4), 1e-3),  # f = 4 divides 64 and 128; 2 r < 64 / 4
    Case("MiSS", lambda: ll.MiSSConfig(), 1e-3),
    Case("MiSS-mini", lambda: ll.MiSSMiniConfig(mini_r=8), 1e-3),
    Case("GraLoRA", lambda: ll.GraLoRAConfig(r=8), 1e-3),
    Case("SHiRA", lambda: ll.SHiRAConfig(), 5e-3),
]


@dataclass
class Row:
    name: str
    trainable: int
    identity: float
    claims_identity: bool  # the spec's "Identity at init:" claim (Variant.identity_at_init)
    loss_before: float
    loss_after: float
    save_load: bool
    detach: bool
    seconds: float

    @property
    def ok(self) -> bool:
        identity = self.identity <= IDENTITY_TOL if self.claims_identity else self.identity > IDENTITY_TOL
        return identity and self.loss_after < self.loss_before and self.save_load and self.detach

    def markdown(self) -> str:
        cells = [
            self.name,
            f"{self.trainable:,}",
            f"{self.identity:.1e}" + ("" if self.claims_identity else " (not claimed)"),
            f"{self.loss_before:.3f} -> {self.loss_after:.3f}",
            _yes(self.save_load),
            _yes(self.detach),
            f"{self.seconds:.1f}",
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = [
    "| variant | trainable params | identity diff | loss before -> after | save/load exact | detach exact | seconds |",
    "|---|---:|---:|---|---|---|---:|",
]


def run(steps: int = 60) -> int:
    """Run every variant through the checks and print a markdown table; 0 if all hold, else 1.

    Runs on one torch thread, as `bench` does (the model is tiny: more threads only contend on a shared
    machine), and puts the thread count back after. Raises ValueError when `steps` < 1.
    """
    if steps < 1:
        raise ValueError(f"the demo needs at least 1 training step, not {steps}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(steps)
    finally:
        torch.set_num_threads(threads)


def _run(steps: int) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print('lora-lite demo needs transformers: pip install "lora-lite[demo]"')
        return 1
    from lora_lite.tiny import qwen3, qwen3_config

    with torch.random.fork_rng(devices=[]):
        # initializer_range wider than Qwen3's 0.02, so gains (IA3) have features to act on
        config = qwen3_config(VOCAB, 64, 128, head_dim=32, initializer_range=0.1, tie_word_embeddings=False)
        model = qwen3(config, seed=SEED)
        held_out = reverse_task(64, torch.Generator().manual_seed(SEED + 1))
        print(
            f"lora-lite demo: tiny Qwen3 (hidden 64, 2 layers, random weights), reverse {LENGTH} digits, "
            f"{steps} AdamW steps of batch {BATCH} per variant, loss on held-out sequences\n"
        )
        print("\n".join(HEADER), flush=True)
        rows = []
        for case in CASES:
            row = check_variant(model, case, steps, held_out)
            print(row.markdown(), flush=True)
            rows.append(row)
    failed = [row.name for row in rows if not row.ok]
    if failed:
        print(
            f"\nFAILED: {', '.join(failed)} (identity diff <= {IDENTITY_TOL:g} where the spec claims it, above where "
            "it does not; loss must fall; exact columns yes)"
        )
        return 1
    print("\nall checks hold")
    return 0


def reverse_task(n: int, generator: torch.Generator) -> Tensor:
    """n sequences `BOS d1..d6 SEP d6..d1`, [n, 2 * LENGTH + 2]."""
    digits = torch.randint(0, DIGITS, (n, LENGTH), generator=generator)
    bos, sep = torch.full((n, 1), BOS), torch.full((n, 1), SEP)
    return torch.cat([bos, digits, sep, digits.flip(1)], dim=1)


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits


def loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Cross-entropy of the reversed digits, each predicted from the tokens before it."""
    predicted = logits(model, ids)[:, LENGTH + 1 : -1]
    return nn.functional.cross_entropy(predicted.reshape(-1, VOCAB), ids[:, LENGTH + 2 :].reshape(-1))


def check_variant(model: nn.Module, case: Case, steps: int, held_out: Tensor) -> Row:
    start = time.perf_counter()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = logits(model, held_out)

    def is_base() -> bool:
        state = model.state_dict()
        with torch.no_grad():
            same_logits = torch.equal(logits(model, held_out), base_logits)
        return (
            same_logits
            and state.keys() == base_state.keys()
            and all(torch.equal(state[k], base_state[k]) for k in state)
            and {n: p.requires_grad for n, p in model.named_parameters()} == base_flags
        )

    torch.manual_seed(SEED)
    calibration = [reverse_task(BATCH, torch.Generator().manual_seed(SEED + 3))]  # used by EVA and CorDA only
    ll.attach(model, case.config(), calibration_data=calibration)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        identity = (logits(model, held_out) - base_logits).abs().max().item()
        loss_before = loss(model, held_out).item()
    optimizer = torch.optim.AdamW(params, lr=case.lr)
    generator = torch.Generator().manual_seed(SEED + 2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, reverse_task(BATCH, generator)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained_logits = logits(model, held_out)
        trained_loss = loss(model, held_out).item()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        ll.save(model, path)
        ll.detach(model)
        detach_exact = is_base()
        ll.load(model, path)
        with torch.no_grad():
            save_load_exact = torch.equal(logits(model, held_out), trained_logits)
        ll.detach(model)
        detach_exact = detach_exact and is_base()
    return Row(
        name=case.name,
        trainable=sum(p.numel() for p in params),
        identity=identity,
        claims_identity=ll.Variant.for_config(case.config()).identity_at_init,
        loss_before=loss_before,
        loss_after=trained_loss,
        save_load=save_load_exact,
        detach=detach_exact,
        seconds=time.perf_counter() - start,
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"
