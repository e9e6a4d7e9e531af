"""PEFT-format export and import: round trips through peft 0.21's PeftModel, refusals, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_mlp, tiny_qwen

import lora_lite as ll

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402


def _randomize(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key, t in ll.adapter_state_dict(model).items():
            if t.requires_grad:
                # gates (IA3 g) scale around 1; everything else, DoRA's m_shift included, is an offset from 0
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(1 + 0.5 * noise if key.endswith(".lora_g") else 0.3 * noise)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(12))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


CONFIGS = {
    "LoRA": lambda: ll.LoRAConfig(r=4, alpha=8, target_names="up|down"),
    "DoRA": lambda: ll.DoRAConfig(r=4, alpha=8, target_names="up|down"),
    "PiSSA": lambda: ll.PiSSAConfig(r=4, alpha=8, target_names="up|down"),
    "IA3": lambda: ll.IA3Config(target_names="up|down"),
    "IA3-FF": lambda: ll.IA3FFConfig(target_names="up|down"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_peft_from_pretrained_reproduces_ours(name: str, tmp_path) -> None:
    ours = tiny_mlp()
    ll.attach(ours, CONFIGS[name]())
    _randomize(ours)
    expected = ours(_x()).detach()
    ll.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down", "up"]
    if name in ("LoRA", "DoRA"):
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    if name == "PiSSA":  # rank-2r LoRA on the original base, same scaling
        assert (config["r"], config["lora_alpha"]) == (8, 16)
    theirs = PeftModel.from_pretrained(tiny_mlp(), tmp_path)  # the original base, also for PiSSA
    _close(theirs(_x()).detach(), expected)


def test_export_lora_on_qwen_has_what_vllm_reads(tmp_path) -> None:
    ours = tiny_qwen()
    ll.attach(ours, ll.LoRAConfig(r=4, alpha=16))
    _randomize(ours)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = ours(ids).logits.detach()
    ll.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 16, ["q_proj", "v_proj"])
    theirs = PeftModel.from_pretrained(tiny_qwen(), tmp_path)
    _close(theirs(ids).logits.detach(), expected)


PEFT_CONFIGS = {
    "LoRA": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False),
    "rsLoRA": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, use_rslora=True
    ),
    "DoRA": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, use_dora=True
    ),
    "IA3": lambda: IA3Config(target_modules=["up", "down"], feedforward_modules=[], init_ia3_weights=False),
    "IA3-FF": lambda: IA3Config(
        target_modules=["up", "down"], feedforward_modules=["up", "down"], init_ia3_weights=False
    ),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_import_reproduces_peft(name: str, tmp_path) -> None:
    torch.manual_seed(13)
    theirs = get_peft_model(tiny_mlp(), PEFT_CONFIGS[name]())  # init_*_weights=False: random, non-identity
    if name == "DoRA":
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "magnitude" in n:
                    p.mul_(1.3)
    expected = theirs(_x()).detach()
    theirs.save_pretrained(tmp_path)
    ours = tiny_mlp()
    assert sorted(ll.import_peft(ours, tmp_path)) == ["down", "up"]
    _close(ours(_x()).detach(), expected)
    ll.detach(ours)  # and it detaches like any lora-lite adapter


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        (lambda: ll.AntiPaSTOConfig(r=2, target_names="up|down"), "PEFT has no AntiPaSTO"),
        (lambda: ll.AntiPaSTOArrowConfig(r=2, k=2, target_names="up|down"), "PEFT has no AntiPaSTO-arrow"),
    ],
    ids=["AntiPaSTO", "AntiPaSTO-arrow"],
)
def test_export_refuses_variants_peft_format_cannot_hold(cfg, words: str, tmp_path) -> None:
    model = tiny_mlp()
    ll.attach(model, cfg())
    with pytest.raises(ll.PeftInteropError, match=words) as info:
        ll.export_peft(model, tmp_path / "out")
    assert "Exportable variants" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_export_without_adapter_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ll.PeftInteropError, match="no lora-lite adapter is attached"):
        ll.export_peft(tiny_mlp(), tmp_path)


def _unchanged(model: torch.nn.Module, before: dict) -> None:
    assert ll.attachment(model) is None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def _peft_lora_folder(tmp_path):
    theirs = get_peft_model(tiny_mlp(), LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"]))
    theirs.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json: no such file"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: no such file"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"), "not a readable safetensors file"),
        (lambda d: _edit(d, peft_type="FROD"), "peft_type 'FROD' is not supported"),
        (lambda d: _edit(d, r=3), r"lora_A.weight is \(2, 20\), \(3, 20\) on this model"),
        (lambda d: _edit(d, rank_pattern={"up": 8}), "per-layer ranks"),
        (lambda d: _edit(d, bias="all"), "trained biases"),
    ],
    ids=["no-config", "no-weights", "bad-weights", "peft-type", "wrong-rank", "rank-pattern", "bias"],
)
def test_import_bad_input_is_clear_and_changes_nothing(spoil, words: str, tmp_path) -> None:
    folder = _peft_lora_folder(tmp_path)
    spoil(folder)
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match=words):
        ll.import_peft(model, folder)
    _unchanged(model, before)


def test_import_for_another_model_names_the_missing_module(tmp_path) -> None:
    folder = _peft_lora_folder(tmp_path)
    model = tiny_qwen()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match="targets 'down', which this model does not have"):
        ll.import_peft(model, folder)
    _unchanged(model, before)


def _edit(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------------- CLI: lora-lite export-peft


def _saved_qwen(tmp_path):
    base = tmp_path / "base"
    tiny_qwen().save_pretrained(base)
    return base


def test_cli_export_peft(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from lora_lite.cli import main

    base = _saved_qwen(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base)
    ll.attach(model, ll.DoRAConfig(r=4, alpha=8))
    _randomize(model)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    expected = model(ids).logits.detach()
    ll.save(model, tmp_path / "adapter.safetensors")
    assert (
        main(["export-peft", str(tmp_path / "adapter.safetensors"), "--base", str(base), "-o", str(tmp_path / "o")])
        == 0
    )
    assert "adapter_config.json" in capsys.readouterr().out
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "o")
    _close(theirs(ids).logits.detach(), expected)


def test_cli_export_peft_bad_input(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from lora_lite.cli import main

    base = _saved_qwen(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base)
    ll.attach(model, ll.FourierFTConfig(n_frequency=16))  # its spectral entries are not PEFT's draw
    ll.save(model, tmp_path / "fourierft.safetensors")
    out = str(tmp_path / "o")
    cases = [
        (["export-peft", str(tmp_path / "none.safetensors"), "--base", str(base), "-o", out], 2, "no such file"),
        (["export-peft", str(tmp_path / "fourierft.safetensors"), "--base", str(tmp_path), "-o", out], 4, "base model"),
        (
            ["export-peft", str(tmp_path / "fourierft.safetensors"), "--base", str(base), "-o", out],
            4,
            "cannot export FourierFT",
        ),
        (["export-peft", str(base / "config.json"), "--base", str(base), "-o", out], 4, "not a readable safetensors"),
    ]
    for argv, code, words in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
