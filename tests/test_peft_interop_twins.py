"""Every variant whose PEFT record has a twin round-trips through PEFT's own file format.

Import: PEFT's model of the method (`peft_twin`), moved off its init by random values on every adapter tensor,
is saved by PEFT (`save_pretrained`); `import_peft` attaches it to a fresh model as the record's variant, and the
outputs and the gradients w.r.t. every adapter tensor equal PEFT's (fp32, within 1e-5 of the scale). Export: our
adapter, moved off its init, written by `export_peft`, is loaded by PEFT (`PeftModel.from_pretrained`) and
computes our outputs. On the tiny MLP: `up` 12 -> 20 with a bias, `down` 20 -> 8 without (d_in != d_out), 3-D
inputs. Records refused by PEFT's format say why, and export writes nothing for them.

The records whose mapping is more than a reshape (LAYOUTS: tensors at the model's top, layout steps, stacked
slots, an offset computed from W, entries PEFT draws on load) also go the whole way on tiny Qwen3 (q_proj 64 -> 128
and v_proj 64 -> 64, with random attention biases) at other ranks and block sizes: PEFT saves, we import, match
PEFT's outputs and gradients, move the adapter, export, and PEFT's load of our file computes our outputs. Their
import is checked in bfloat16 too (within BF16_TOL of the scale).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import PARITY_MODELS, run_both, tiny_mlp, within_scale

import lora_lite as ll
from lora_lite.peft_records import RECORDS, copy_to_twin, peft_twin, twin_gradients

peft = pytest.importorskip("peft")

TOL = 1e-5
# bf16 (the seven LAYOUTS records): a few bf16 ulps (spacing 2^-7) of the scale, as tests/test_peft_zoo4.py; the two
# sides round in other orders (measured at most 1.2e-2, FourierFT's gradients)
BF16_TOL = 3e-2
# small values for the hypers a variant has, so that the MLP's layers fit
HYPERS = {"r": 4, "alpha": 8, "b": 4, "k": 2, "group_size": 4, "n_frequency": 16, "num_vectors": 8, "vector_length": 4}
# BEFT's merge needs a layer bias (see tests/test_variants.py), `up` has one; C3A on one layer: PEFT 0.21's own
# backward gives C3A a wrong input gradient (tests/test_peft_spectral.py), which would reach a layer before it
TARGETS = {"beft": ["up"], "c3a": ["up"]}
TWINS = sorted(n for n, r in RECORDS.items() if r.twin is not None and r.refused is None and r.convert is None)
TWINS = [n for n in TWINS if RECORDS[n].twin.init is None]  # EVA's twin initialises from data: test_peft_parity
REFUSED = sorted(n for n, r in RECORDS.items() if r.refused is not None)
LAYOUTS = ["deft", "fourierft", "gralora", "road_4", "tinylora", "vera", "waveft"]
# Qwen3's layers take larger hypers: GraLoRA k=4 (r=8), RoAd-4 groups of 16, 100 spectral entries
QWEN_HYPERS = {"r": 8, "alpha": 4, "k": 4, "group_size": 16, "n_frequency": 100, "u": 8}


@pytest.fixture(autouse=True)
def _boft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's BOFT first tries to build its CUDA extension (about 20 s a layer, then a warning); one butterfly
    factor runs on PEFT's CPU path without it (as tests/test_peft_boft.py runs it)."""
    from peft.tuners.boft import layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: None)


def _config(name: str, targets: list[str], hypers: dict = HYPERS) -> ll.AdapterConfig:
    variant = ll.Variant.registry[name]
    fields = {f.name for f in variant.config_class.hyper_fields()}
    regex = "(^|\\.)(" + "|".join(targets) + ")$"
    return variant.config_class(target_names=regex, **{k: v for k, v in hypers.items() if k in fields})


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))


def test_the_twins_cover_the_issues_methods() -> None:
    ll.import_variants()
    assert {"hra", "delora", "loha", "adalora", "hira", "beft", "oft", "oft_cayley"} <= set(TWINS)


RUNS = [(name, torch.float32) for name in TWINS] + [(name, torch.bfloat16) for name in LAYOUTS]


@pytest.mark.parametrize(("name", "dtype"), RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in RUNS])
def test_a_folder_peft_saved_imports_with_peft_outputs_and_gradients(
    name: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    ll.import_variants()
    targets = TARGETS.get(name, ["up", "down"])
    cfg = _config(name, targets)
    cfg.dtype = dtype
    torch.manual_seed(11)
    theirs = peft_twin(tiny_mlp().to(dtype), cfg, targets, autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # off PEFT's init (identity), every adapter tensor
                p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_mlp().to(dtype)
    assert sorted(ll.import_peft(ours, tmp_path / "peft")) == sorted(targets)
    assert ll.attachment(ours).variant.name == {"lorafa": "lora"}.get(name, name)  # LoRA-FA's file is LoRA's
    copy_to_twin(ours, theirs)  # our imported values written back: PEFT's, up to the offsets' rounding
    tol = TOL if dtype == torch.float32 else BF16_TOL
    out_ours, out_peft = run_both(ours, theirs, _x(), dtype)
    within_scale(out_ours, out_peft, tol, "forward")
    grads = twin_gradients(ours, theirs)  # PEFT's gradients back through the record's layout (GraLoRA's blocks)
    assert len(grads) >= len(targets)
    for key, ours_grad, peft_grad in grads:
        within_scale(ours_grad, peft_grad, tol, f"gradient of {key}")


@pytest.mark.parametrize("name", TWINS)
def test_export_writes_a_folder_peft_loads_with_our_outputs(name: str, tmp_path: Path) -> None:
    ll.import_variants()
    ours, targets = tiny_mlp(), TARGETS.get(name, ["up", "down"])
    cfg = _config(name, targets)
    if RECORDS[name].redrawn:  # PEFT draws these slots itself on load: ours start from PEFT's (its init, imported)
        peft_twin(tiny_mlp(), cfg, targets, autocast_adapter_dtype=False).save_pretrained(tmp_path / "init")
        ll.import_peft(ours, tmp_path / "init")
    else:
        ll.attach(ours, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in ll.adapter_state_dict(ours).values():
            if t.requires_grad:
                t.add_(0.2 * torch.randn(t.shape, generator=gen))
    x = _x()
    expected = ours.eval()(x).detach()  # from_pretrained gives PEFT's model in eval mode (PVeRA takes the mean)
    ll.export_peft(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no unknown config field, no missing or unexpected key
        theirs = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path / "out")
    got = theirs(x).detach()
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


@pytest.mark.parametrize("name", REFUSED)
def test_a_variant_peft_cannot_hold_is_refused_with_the_reason(name: str, tmp_path: Path) -> None:
    ll.import_variants()
    model = tiny_mlp()
    variant = ll.Variant.registry[name]
    ll.attach(model, _config(name, ["up", "down"]), calibration_data=[_x()] if variant.stats else None)
    with pytest.raises(ll.PeftInteropError, match=RECORDS[name].refused[:30].replace("(", "\\(")):
        ll.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(n for n, r in RECORDS.items() if r.redrawn))
def test_export_refuses_slots_peft_would_draw_otherwise(name: str, tmp_path: Path) -> None:
    """FourierFT's and WaveFT's spectral entries drawn by our attach (per layer) are not the ones PEFT draws from
    random_loc_seed when it loads a file: export says so, names the way that works, and writes nothing."""
    ll.import_variants()
    model = tiny_mlp()
    ll.attach(model, _config(name, ["up", "down"]))
    with pytest.raises(ll.PeftInteropError, match="PEFT's file does not hold idx, which PEFT draws again") as e:
        ll.export_peft(model, tmp_path / "out")
    assert "lora_lite.import_peft" in str(e.value) and "lora_lite.save" in str(e.value)
    assert not (tmp_path / "out").exists()


def _qwen_biased() -> torch.nn.Module:
    """Tiny Qwen3 with random attention biases (they start at zero, which would hide a bias term)."""
    model, gen = PARITY_MODELS["qwen"][0](), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_records_round_trip_on_qwen(name: str, tmp_path: Path) -> None:
    ll.import_variants()
    _, targets, make_x = PARITY_MODELS["qwen"]
    cfg = _config(name, targets, QWEN_HYPERS)
    torch.manual_seed(11)
    theirs = peft_twin(_qwen_biased(), cfg, targets, autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(tmp_path / "peft")
    ours = _qwen_biased()
    assert sorted(ll.import_peft(ours, tmp_path / "peft")) == sorted(
        n for n, _ in ours.named_modules() if n.endswith(tuple(targets))
    )
    assert ll.attachment(ours).variant.name == name
    copy_to_twin(ours, theirs)
    out_ours, out_peft = run_both(ours, theirs, make_x(), torch.float32)
    within_scale(out_ours, out_peft, TOL, "forward")
    grads = twin_gradients(ours, theirs)
    assert len(grads) >= 4
    for key, ours_grad, peft_grad in grads:
        within_scale(ours_grad, peft_grad, TOL, f"gradient of {key}")
    with torch.no_grad():  # as training would: the imported adapter moves, then goes back to PEFT
        for t in ll.adapter_state_dict(ours).values():
            if t.requires_grad:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
        expected = ours(make_x()).logits
    ll.export_peft(ours, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again = peft.PeftModel.from_pretrained(_qwen_biased(), tmp_path / "out")
    with torch.no_grad():
        within_scale(again(make_x()).logits, expected, TOL, "PEFT's load of our export")


FORMS = {  # a PEFT config of another form of a method than the record's twin -> what the refusal names
    "VeRA without its projections": (
        lambda t: peft.VeraConfig(r=4, target_modules=t, save_projection=False),
        "save_projection=True, not False",
    ),
    "TinyLoRA with v tied": (
        lambda t: peft.TinyLoraConfig(r=2, u=4, target_modules=t, weight_tying=1.0),
        "weight_tying=0.0, not 1.0",
    ),
    "DEFT by QR": (
        lambda t: peft.DeftConfig(r=4, target_modules=t, decomposition_method="qr"),
        "decomposition_method='relu', not 'qr'",
    ),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_import_refuses_another_form_of_the_method_by_name(form: str, tmp_path: Path) -> None:
    make, words = FORMS[form]
    peft.get_peft_model(tiny_mlp(), make(["up", "down"])).save_pretrained(tmp_path)
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.PeftInteropError, match="in a form no variant here computes") as e:
        ll.import_peft(model, tmp_path)
    assert words in str(e.value) and "PeftModel.from_pretrained" in str(e.value)
    assert ll.attachment(model) is None and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_deft_without_alpha_imports_with_peft_scale_one(tmp_path: Path) -> None:
    """PEFT's DEFT alpha=None scales the injection by 1: our alpha's default (r) does the same."""
    theirs = peft.get_peft_model(tiny_mlp(), peft.DeftConfig(r=4, target_modules=["up", "down"], init_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = tiny_mlp()
    ll.import_peft(ours, tmp_path)
    assert ll.attachment(ours).cfg.alpha == 4
    with torch.no_grad():
        expected = theirs(_x())
        assert (expected - tiny_mlp()(_x())).abs().max() > 1e-3  # init_weights=False: not the identity
        within_scale(ours(_x()), expected, TOL, "forward")


@pytest.mark.parametrize("name", TWINS)
def test_each_record_mapping_is_undone_by_its_inverse(name: str) -> None:
    """our_tensors(peft_tensors(x)) is x for every mapped slot, on a layer of each shape of the MLP (with the
    offsets: up to float32 rounding; without them, the layout alone: exactly), and no two slots land on one entry
    (an index set PEFT holds as (row, column) pairs, SHiRA's, is a conversion: exact, but not a layout)."""
    ll.import_variants()
    record, cfg = RECORDS[name], _config(name, ["up"])
    variant, gen = ll.Variant.registry[name], torch.Generator().manual_seed(0)
    for d_in, d_out in ((12, 20), (20, 8)):
        pairs = {n for n, spec in record.tensors.items() if spec.pairs}
        slot = {
            s.name: torch.randint(0, d_in * d_out, s.shape, generator=gen)
            if s.name in pairs
            else torch.randn(s.shape, generator=gen)
            for s in variant.slots(cfg, d_in, d_out)
        }
        W = torch.randn(d_out, d_in, generator=gen)
        for offsets in (True, False):
            laid_out = record.peft_tensors(cfg, slot, W, 3, offsets, d_in=d_in)
            back = record.our_tensors(cfg, slot, laid_out, W, 3, offsets, d_in=d_in)
            assert set(back) == {n for n, spec in record.tensors.items() if not spec.shared}
            for n, value in back.items():
                assert value.shape == slot[n].shape
                assert torch.allclose(value, slot[n], atol=1e-5) if offsets else torch.equal(value, slot[n]), n
        numbered = {
            n: torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) + 1e4 * i
            for i, (n, t) in enumerate(slot.items())
        }
        converted = {spec.key for spec in record.tensors.values() if spec.pairs}
        laid = record.peft_tensors(cfg, numbered, offsets=False, d_in=d_in)
        laid = torch.cat([t.reshape(-1) for key, t in laid.items() if key not in converted])
        mapped = sum(slot[n].numel() for n, spec in record.tensors.items() if not spec.shared and not spec.pairs)
        assert laid.unique().numel() == laid.numel() == mapped  # a permutation of our entries: none dropped or doubled


def test_import_in_a_fresh_process_finds_the_twins_variant(tmp_path: Path) -> None:
    """import_peft is the first thing a process does with lora_lite: the variant of the file's twin is registered
    on the way (no KeyError for a variant whose generated module nobody imported yet)."""
    import subprocess
    import sys

    peft.get_peft_model(tiny_mlp(), peft.HRAConfig(r=4, target_modules=["up", "down"])).save_pretrained(tmp_path)
    code = (
        "import lora_lite as ll\nfrom lora_lite.verify import TinyMLP\nmodel = TinyMLP()\n"
        f"print(sorted(ll.import_peft(model, {str(tmp_path)!r})), ll.attachment(model).variant.name)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "['down', 'up'] hra"


def test_a_shared_tensor_peft_repeats_per_layer_must_agree(tmp_path: Path) -> None:
    """PEFT's RandLoRA file holds randlora_A at the model's top and again under every layer: import takes one and
    refuses a file whose copies differ, attaching nothing."""
    from safetensors.torch import load_file, save_file

    ll.import_variants()
    cfg = _config("randlora", ["up", "down"])
    peft_twin(tiny_mlp(), cfg, ["up", "down"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    assert {k for k in tensors if k.endswith("randlora_A")} == {
        "base_model.randlora_A",
        "base_model.model.up.randlora_A",
        "base_model.model.down.randlora_A",
    }
    tensors["base_model.model.down.randlora_A"] = tensors["base_model.model.down.randlora_A"] + 1
    save_file(tensors, path)
    model = tiny_mlp()
    with pytest.raises(ll.PeftInteropError, match="down.randlora_A differs from its other copies; RandLoRA shares"):
        ll.import_peft(model, tmp_path)
    assert ll.attachment(model) is None
