"""A researcher's own variant, outside the package: compile, import, register, save, load, export.

Each test compiles a spec into a folder of its own (`mygen/` under tmp_path, put on sys.path) with the
`lora-lite compile` command, as docs/tutorial.md does, and imports the generated module.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_mlp
from torch import nn

import lora_lite as ll
from lora_lite.cli import main
from lora_lite.compiler.driver import OWN_GENERATED, PACKAGE
from lora_lite.compiler.spec_hash import spec_hash
from lora_lite.variant import Variant

ROOT = Path(__file__).resolve().parent.parent
RSLORA = '''adapter rslora "rsLoRA" https://arxiv.org/abs/2312.03732
"""
Rank-stabilized LoRA. Identity at init: B = 0.
"""

hyper r: int = 8
hyper alpha: float = 16

let s = alpha / sqrt(r)  # rsLoRA's scale
param A[r, d_in] = kaiming
param B[d_out, r] = zeros

output y + s * B @ A @ x
'''


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A researcher's folder: my_specs/rslora.adapter, compiled into mygen/ by `write(...)`; importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ll.import_variants()  # the built-ins registered before the registry is saved, so that restoring keeps them
    saved = dict(Variant.registry)
    (tmp_path / "my_specs").mkdir()
    yield tmp_path
    Variant.registry.clear()
    Variant.registry.update(saved)
    for name in [n for n in sys.modules if n.split(".")[0] in ("mygen", "othergen", "rslora")]:
        del sys.modules[name]


def compile_spec(folder: Path, source: str, out: str = "mygen", name: str = "rslora") -> int:
    (folder / "my_specs" / f"{name}.adapter").write_text(source, encoding="utf-8")
    return main(["compile", str(folder / "my_specs"), "-o", str(folder / out)])


def model_and_input() -> tuple[nn.Module, torch.Tensor]:
    return tiny_mlp(), torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))


def trained(cfg) -> nn.Module:
    model, x = model_and_input()
    ll.attach(model, cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    return model


# ---------------------------------------------------------------- compile


def test_compile_prints_import_path_and_config_class(user: Path, capsys: pytest.CaptureFixture[str]) -> None:
    title = RSLORA.replace('"rsLoRA"', '"LoRA-FA-svd"')  # the example of a class name to guess
    assert compile_spec(user, title) == 0
    out = capsys.readouterr().out
    assert "  mygen.rslora: LoRAFASvd, LoRAFASvdConfig\n" in out
    assert f"import them with {user} on sys.path: from mygen.rslora import LoRAFASvdConfig" in out
    assert importlib.import_module("mygen.rslora").LoRAFASvdConfig.__name__ == "LoRAFASvdConfig"


def test_an_output_folder_python_cannot_import_gets_a_warning(user: Path, capsys) -> None:
    assert compile_spec(user, RSLORA, out="my-gen") == 0
    captured = capsys.readouterr()
    assert "warning: 'my-gen' is not a Python package name" in captured.err and "(-o my_gen)" in captured.err
    assert "import them" not in captured.out  # no `from my-gen.rslora import ...`, which is no Python
    assert compile_spec(user, RSLORA, out="mygen") == 0
    assert "warning" not in capsys.readouterr().err


def test_compile_never_writes_into_the_package(user: Path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in OWN_GENERATED.iterdir() if p.is_file()}
    (user / "my_specs" / "rslora.adapter").write_text(RSLORA, encoding="utf-8")
    assert main(["compile", str(user / "my_specs"), "-o", str(OWN_GENERATED)]) == 2
    assert "lora-lite's own generated/ folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in OWN_GENERATED.iterdir() if p.is_file()} == before
    inside = PACKAGE / "mygen_test_never_written"
    assert main(["compile", str(user / "my_specs"), "-o", str(inside)]) == 2
    assert "inside the installed lora-lite package" in capsys.readouterr().err
    assert not inside.exists()


@pytest.mark.parametrize("victim", ["rslora.py", "__init__.py"])
def test_compile_never_overwrites_a_file_it_did_not_generate(user: Path, victim: str, capsys) -> None:
    (user / "mygen").mkdir()
    mine = "# my own code\nVALUE = 1\n"
    (user / "mygen" / victim).write_text(mine, encoding="utf-8")
    assert compile_spec(user, RSLORA) == 2
    assert "no 'DO NOT EDIT' marker" in capsys.readouterr().err
    assert (user / "mygen" / victim).read_text(encoding="utf-8") == mine
    assert sorted(p.name for p in (user / "mygen").iterdir()) == [victim]  # nothing else written either


def test_compile_deletes_only_its_own_orphans(user: Path) -> None:
    assert compile_spec(user, RSLORA) == 0
    (user / "mygen" / "notes.py").write_text("# mine\n", encoding="utf-8")
    (user / "my_specs" / "rslora.adapter").unlink()
    (user / "my_specs" / "rs.adapter").write_text(RSLORA.replace("adapter rslora", "adapter rs"), encoding="utf-8")
    assert main(["compile", str(user / "my_specs"), "-o", str(user / "mygen")]) == 0
    assert sorted(p.name for p in (user / "mygen").glob("*.py")) == ["__init__.py", "notes.py", "rs.py"]


def test_a_builtin_name_with_other_math_is_a_compile_error(user: Path, capsys) -> None:
    assert compile_spec(user, RSLORA.replace("adapter rslora", "adapter lora"), name="lora") == 1
    err = capsys.readouterr().err
    assert "error[E104]: 'lora' is the name of a built-in variant (lora_lite.generated.lora)" in err
    assert not (user / "mygen").exists()


def test_the_builtin_spec_itself_may_keep_its_name(user: Path, capsys) -> None:
    """A copy of specs/lora.adapter with other comments computes what LoRA computes: it is LoRA, no clash."""
    source = (ROOT / "specs" / "lora.adapter").read_text(encoding="utf-8") + "# my copy\n"
    assert compile_spec(user, source, name="lora") == 0
    module = importlib.import_module("mygen.lora")
    cfg = module.LoRAConfig(r=2, target_names=None)
    model, _ = model_and_input()
    ll.attach(model, cfg)  # one variant, whichever module registered it last
    assert ll.attachment(model).variant.spec_hash == ll.LoRA.spec_hash


# ---------------------------------------------------------------- registration


def _module_named(user: Path, source: str, folder: str, name: str = "rslora") -> object:
    (user / "my_specs").mkdir(exist_ok=True)
    assert compile_spec(user, source, out=folder, name=name) == 0
    return importlib.import_module(f"{folder}.{name}")


def test_registration_refuses_a_builtin_name(user: Path) -> None:
    """A module compiled before E104 existed (or edited by hand) still cannot take over `lora`."""
    assert compile_spec(user, RSLORA) == 0
    path = user / "mygen" / "rslora.py"
    path.write_text(path.read_text(encoding="utf-8").replace('name = "rslora"', 'name = "lora"'), encoding="utf-8")
    with pytest.raises(TypeError, match=r"variant name 'lora' is taken by lora_lite\.generated\.lora\.LoRA"):
        importlib.import_module("mygen.rslora")
    assert Variant.registry["lora"].__module__ == "lora_lite.generated.lora"


def test_registration_refuses_another_variant_with_the_same_name(user: Path) -> None:
    _module_named(user, RSLORA, "mygen")
    (user / "my_specs" / "rslora.adapter").unlink()
    other = RSLORA.replace("alpha / sqrt(r)", "2 * alpha / sqrt(r)")
    with pytest.raises(TypeError, match=r"'rslora' is taken by mygen\.rslora\.Rslora, which computes something else"):
        _module_named(user, other, "othergen")


def test_registration_refuses_a_class_name_another_variant_has(user: Path) -> None:
    _module_named(user, RSLORA, "mygen")
    (user / "my_specs" / "rslora.adapter").unlink()
    with pytest.raises(TypeError, match=r"class name Rslora is taken by variant 'rslora' \(mygen\.rslora\)"):
        _module_named(user, RSLORA.replace("adapter rslora", "adapter rs2"), "othergen", name="rs2")


def test_configs_from_an_earlier_import_still_attach(user: Path) -> None:
    module = _module_named(user, RSLORA, "mygen")
    old_cfg = module.RsloraConfig(r=2, target_names=None)
    reloaded = importlib.reload(module)  # a notebook cell run again
    assert reloaded.RsloraConfig is not type(old_cfg)
    assert ll.RsloraConfig is reloaded.RsloraConfig  # ll.<Name>Config follows the registry, not a cached import
    model, _ = model_and_input()
    assert ll.attach(model, old_cfg) == ["up", "down"]
    ll.detach(model)
    sys.path.insert(0, str(user / "mygen"))
    try:
        same = importlib.import_module("rslora")
    finally:
        sys.path.remove(str(user / "mygen"))
    assert same.__name__ == "rslora" and same.Rslora is not module.Rslora  # the same file, another import path
    ll.attach(model, module.RsloraConfig(r=2, target_names=None))
    ll.detach(model)
    ll.attach(model, same.RsloraConfig(r=2, target_names=None))


def test_an_unknown_config_names_its_module() -> None:
    class Orphan(ll.AdapterConfig):
        pass

    with pytest.raises(TypeError, match=r"Orphan is not the config of any registered variant: import the module"):
        ll.attach(tiny_mlp(), Orphan())


def test_lora_lite_has_no_attribute_for_a_variant_not_imported() -> None:
    with pytest.raises(AttributeError, match="reached here once its generated module is imported"):
        ll.NotAVariantConfig  # noqa: B018


# ---------------------------------------------------------------- save and load


def test_load_names_the_module_and_imports_nothing(user: Path) -> None:
    module = _module_named(user, RSLORA, "mygen")
    model = trained(module.RsloraConfig(r=2, target_names=None))
    ll.save(model, user / "a.safetensors")
    del Variant.registry["rslora"]  # a fresh process: nothing imported mygen
    for name in [n for n in sys.modules if n.startswith("mygen")]:
        del sys.modules[name]
    fresh, _ = model_and_input()
    with pytest.raises(ValueError, match=r"it was saved from module 'mygen\.rslora': `import mygen\.rslora`"):
        ll.load(fresh, user / "a.safetensors")
    assert "mygen.rslora" not in sys.modules and "rslora" not in Variant.registry
    assert ll.attachment(fresh) is None


def test_a_comment_edit_keeps_adapters_loadable_and_a_math_edit_refuses_them(user: Path) -> None:
    module = _module_named(user, RSLORA, "mygen")
    model = trained(module.RsloraConfig(r=2, target_names=None))
    _, x = model_and_input()
    with torch.no_grad():
        expected = model(x)
    ll.save(model, user / "a.safetensors")
    cosmetic = RSLORA.replace("# rsLoRA's scale", "# the scale of rsLoRA, Kalajdzievski 2023").replace(
        '"rsLoRA"', '"rsLoRA"   '
    )
    cosmetic = cosmetic.replace("Identity at init: B = 0.", "Identity at init: B = 0, so B A x = 0.") + "\n\n"
    assert cosmetic != RSLORA and spec_hash(cosmetic) == spec_hash(RSLORA)
    assert compile_spec(user, cosmetic) == 0
    importlib.reload(module)
    fresh, _ = model_and_input()
    ll.load(fresh, user / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    math = RSLORA.replace("alpha / sqrt(r)", "alpha / r")
    assert compile_spec(user, math) == 0
    importlib.reload(module)
    other, _ = model_and_input()
    with pytest.raises(ValueError, match="compiled from another spec"):
        ll.load(other, user / "a.safetensors")
    assert ll.attachment(other) is None


@pytest.mark.parametrize(
    ("edit", "same"),
    [
        (lambda s: s.replace("hyper r: int = 8", "hyper r: int  =  8   # rank"), True),
        (lambda s: s.replace("let s = alpha / sqrt(r)", "let s = alpha \\\n    / sqrt(r)"), True),
        (lambda s: s.replace(" https://arxiv.org/abs/2312.03732", ""), True),
        (lambda s: s.replace("Rank-stabilized", "Rank stabilised"), True),
        (lambda s: s.replace("hyper r: int = 8", "hyper r: int = 4"), False),
        (lambda s: s.replace("let s", "let scale").replace("y + s", "y + scale"), False),
        (lambda s: s.replace("= zeros", "= kaiming"), False),
        (lambda s: s.replace("adapter rslora", "adapter rslora2"), False),
    ],
    ids=["spaces-comment", "continuation", "url", "docstring", "default", "rename", "init", "name"],
)
def test_which_edits_change_the_spec_hash(edit, same: bool) -> None:
    edited = edit(RSLORA)
    assert edited != RSLORA
    assert (spec_hash(edited) == spec_hash(RSLORA)) is same


# ---------------------------------------------------------------- export to PEFT


def test_user_rslora_exports_as_peft_use_rslora(user: Path) -> None:
    peft = pytest.importorskip("peft")
    module = _module_named(user, RSLORA, "mygen")
    model = trained(module.RsloraConfig(r=4, alpha=8, target_names=None))
    _, x = model_and_input()
    with torch.no_grad():
        expected = model(x)
    ll.export_peft(model, user / "peft")
    config = json.loads((user / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, True)
    theirs = peft.PeftModel.from_pretrained(tiny_mlp(), user / "peft")
    with torch.no_grad():
        assert (theirs(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_user_variant_peft_cannot_hold_is_refused_with_the_reason(user: Path) -> None:
    gated = RSLORA.replace("param B[d_out, r] = zeros", "param B[d_out, r] = zeros\nparam g[d_out] = ones")
    module = _module_named(user, gated.replace("output y", "output g * y"), "mygen")
    model = trained(module.RsloraConfig(r=2, target_names=None))
    with pytest.raises(
        ll.PeftInteropError, match=r"on a 5 x 7 layer with r=2 this variant holds A \[2, 7\], B \[5, 2\], g \[5\]"
    ):
        ll.export_peft(model, user / "peft")
    half = RSLORA.replace("adapter rslora", "adapter half").replace('"rsLoRA"', '"Half"')
    scaled = _module_named(user, half.replace("alpha / sqrt(r)", "alpha / r / 2"), "othergen", name="half")
    model = trained(scaled.HalfConfig(r=2, target_names=None))
    with pytest.raises(ll.PeftInteropError, match=r"its forward is not PEFT LoRA's y \+ \(alpha / r\) B A x"):
        ll.export_peft(model, user / "peft")
    assert not (user / "peft").exists()


def test_user_variant_that_is_plain_lora_exports_as_lora(user: Path) -> None:
    mine = _module_named(user, RSLORA.replace("alpha / sqrt(r)", "alpha / r"), "mygen")
    ll.export_peft(trained(mine.RsloraConfig(r=4, alpha=8, target_names=None)), user / "peft")
    config = json.loads((user / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
