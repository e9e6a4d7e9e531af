"""Nothing lost on bad input: atomic save, load that validates before it changes anything, attach all or nothing.

Every load fault in LOAD_FAULTS gets an error that names the problem, and the model is left exactly as it
was (state_dict, trainable flags, hooks, attachment); no file is ever unpickled (a pickle with a canary in
it is one of the faults).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import COUNTS, tiny_mlp, tiny_qwen
from safetensors import safe_open
from safetensors.torch import save_file
from test_runtime import assert_unchanged, snapshot
from torch import nn

import lora_lite as ll
from lora_lite import runtime


class PickleCanary:
    """Unpickling it sets an environment variable: it proves load never unpickles."""

    def __reduce__(self):
        return (exec, ("import os; os.environ['LORA_LITE_PICKLE_CANARY'] = '1'",))


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA adapter saved from tiny_mlp, and its tensors and metadata to make faulty copies of."""
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=None))
    path = tmp_path / "good.safetensors"
    ll.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(tensors: dict | None = None, **meta: str | None) -> Callable[[Path, dict, dict, Path], None]:
    """A fault made by writing the good tensors (or `tensors(good)`) with some metadata changed or dropped."""

    def make(good: Path, good_tensors: dict, good_meta: dict, out: Path) -> None:
        metadata = {k: v for k, v in {**good_meta, **meta}.items() if v is not None}
        save_file(tensors(dict(good_tensors)) if tensors else good_tensors, out, metadata=metadata)

    return make


def raw(transform: Callable[[bytes], bytes]) -> Callable[[Path, dict, dict, Path], None]:
    def make(good: Path, good_tensors: dict, good_meta: dict, out: Path) -> None:
        out.write_bytes(transform(good.read_bytes()))

    return make


def pickled(good: Path, good_tensors: dict, good_meta: dict, out: Path) -> None:
    torch.save({"up.lora_A": PickleCanary()}, out)


def with_config(**changes: object) -> Callable[[Path, dict, dict, Path], None]:
    def make(good: Path, good_tensors: dict, good_meta: dict, out: Path) -> None:
        cfg = {**json.loads(good_meta["config"]), **changes}
        save_file(good_tensors, out, metadata={**good_meta, "config": json.dumps(cfg)})

    return make


def corrupt_header(data: bytes) -> bytes:
    return data[:8] + data[8:40].replace(b'"', b"}") + data[40:]


LOAD_FAULTS: dict[str, tuple[Callable[[Path, dict, dict, Path], None], str]] = {
    "empty file": (raw(lambda d: b""), "not a readable safetensors file"),
    "truncated to 4 bytes": (raw(lambda d: d[:4]), "not a readable safetensors file"),
    "truncated in the header": (raw(lambda d: d[:60]), "not a readable safetensors file"),
    "truncated in the tensor data": (raw(lambda d: d[: len(d) - 100]), "not a readable safetensors file"),
    "corrupted header": (raw(corrupt_header), "not a readable safetensors file"),
    "header length of 2**60": (raw(lambda d: (2**60).to_bytes(8, "little") + d[8:]), "not a readable safetensors"),
    "a pickle (torch.save) with a canary": (pickled, "not a readable safetensors file"),
    "no metadata at all": (
        rewrite(format=None, variant=None, spec_hash=None, config=None, targets=None),
        "format None",
    ),
    "another format": (rewrite(format="peft/1"), "not written by lora_lite.save"),
    "metadata lacks variant": (rewrite(variant=None), "metadata lacks variant"),
    "metadata lacks spec_hash": (rewrite(spec_hash=None), "metadata lacks spec_hash"),
    "metadata lacks config": (rewrite(config=None), "metadata lacks config"),
    "metadata lacks targets": (rewrite(targets=None), "metadata lacks targets"),
    "unknown variant": (rewrite(variant="lora_v2"), "unknown variant 'lora_v2'"),
    "spec hash differs from the installed module": (rewrite(spec_hash="0" * 64), "compiled from another spec"),
    "config not JSON": (rewrite(config="{r: 4"), "adapter config in the metadata is unreadable"),
    "config with an unknown field": (with_config(rank=4), "has no fields"),
    "config with a wrong type": (with_config(r="4"), "must be an int"),
    "config failing a requirement": (with_config(r=0), r"r >= 1"),
    "targets not a list": (rewrite(targets='{"up": 1}'), "targets must be a list of distinct module names"),
    "targets repeated": (rewrite(targets='["up", "up"]'), "targets must be a list of distinct module names"),
    "target path the model lacks": (rewrite(targets='["up", "mlp.up"]'), "targets 'mlp.up', which this model"),
    "target that is not a linear layer": (rewrite(targets='[""]'), "is a TinyMLP, not a linear layer"),
    "wrong shapes": (with_config(r=2), r"up.lora_A is \(4, 12\) in the file, \(2, 12\) on this model"),
    "missing key": (
        rewrite(lambda t: {k: v for k, v in t.items() if k != "down.lora_B"}),
        "missing tensor down.lora_B",
    ),
    "unexpected key": (rewrite(lambda t: {**t, "up.lora_C": torch.zeros(2)}), "unexpected tensor up.lora_C"),
    "integer tensor": (rewrite(lambda t: {**t, "up.lora_B": t["up.lora_B"].long()}), "int64 in the file, not a floa"),
    "a folder, not a file": (lambda good, t, m, out: out.mkdir(), "not a readable safetensors file"),
}


@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_load_fault_names_the_problem_and_changes_nothing(fault: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LORA_LITE_PICKLE_CANARY", raising=False)
    make, message = LOAD_FAULTS[fault]
    good, tensors, meta = saved(tmp_path)
    bad = tmp_path / "bad.safetensors"
    make(good, tensors, meta, bad)
    model = tiny_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        ll.load(model, bad)
    assert_unchanged(model, before)
    assert "LORA_LITE_PICKLE_CANARY" not in os.environ
    COUNTS["load faults: refused, model unchanged, nothing unpickled"] += 1


def test_the_pickle_canary_fires_when_unpickled(tmp_path: Path, monkeypatch) -> None:
    """So its silence in the fault above means load did not unpickle."""
    monkeypatch.delenv("LORA_LITE_PICKLE_CANARY", raising=False)
    pickled(tmp_path, {}, {}, tmp_path / "p.pt")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert os.environ["LORA_LITE_PICKLE_CANARY"] == "1"


def test_load_into_a_model_that_has_an_adapter_changes_nothing(tmp_path: Path) -> None:
    good, _, _ = saved(tmp_path)
    model = tiny_mlp()
    ll.attach(model, ll.IA3Config(target_names=None))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="already has an adapter attached"):
        ll.load(model, good)
    assert_unchanged(model, before)
    with pytest.raises(FileNotFoundError):
        ll.load(tiny_mlp(), tmp_path / "missing.safetensors")


def test_spec_change_is_refused_unless_allowed(tmp_path: Path) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=None))
    with torch.no_grad():
        model.up.lora_B.normal_()
        x = torch.randn(3, 12)
        trained = model(x)
    ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, tmp_path / "old.safetensors", metadata={**meta, "spec_hash": "ab" * 32})
    fresh = tiny_mlp()
    with pytest.raises(ValueError, match=r"sha256 abababababab; the installed module lora_lite.generated.lora has"):
        ll.load(fresh, tmp_path / "old.safetensors")
    ll.load(fresh, tmp_path / "old.safetensors", allow_spec_change=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained)


def test_load_fault_table_covers_every_kind_the_issue_lists() -> None:
    kinds = ["truncated", "corrupted header", "metadata lacks", "unknown variant", "spec hash", "wrong shapes"]
    kinds += ["missing key", "unexpected key", "target path the model lacks", "pickle"]
    for kind in kinds:
        assert any(kind in fault for fault in LOAD_FAULTS), kind
    assert len(LOAD_FAULTS) >= 25


# ---------------------------------------------------------------- save


def test_save_is_atomic_when_the_write_fails_midway(tmp_path: Path, monkeypatch) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=None))
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)
    previous = path.read_bytes()
    with torch.no_grad():
        model.up.lora_B.fill_(1.0)

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(previous[: len(previous) // 2])  # some bytes reach the disk, then:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        ll.save(model, path)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temporary file left
    monkeypatch.undo()
    fresh = tiny_mlp()
    ll.load(fresh, path)
    assert torch.equal(fresh.up.lora_B, torch.zeros_like(fresh.up.lora_B))  # the previous adapter, intact


def test_saved_file_has_the_mode_a_plain_write_gives(tmp_path: Path) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.IA3Config(target_names=None))
    ll.save(model, tmp_path / "a.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    mode = stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


# ---------------------------------------------------------------- attach


def test_attach_failing_on_the_fifth_target_undoes_the_first_four(monkeypatch) -> None:
    model = tiny_qwen()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = snapshot(model)
    pissa = ll.PiSSA
    real = pissa.residual
    done: list[str] = []

    def residual(layer, cfg, W):
        if len(done) == 4:
            raise RuntimeError("out of memory on the fifth target")
        done.append(layer)
        return real(layer, cfg, W)

    monkeypatch.setattr(pissa, "residual", staticmethod(residual))
    with pytest.raises(RuntimeError, match="fifth target"):
        ll.attach(model, ll.PiSSAConfig(r=4, target_names=None))
    assert len(done) == 4
    assert_unchanged(model, before)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module.weight is weights[name]  # the same Parameter, its original tensor back
            assert not [k for k in (*module._parameters, *module._buffers) if k.startswith(("lora_", "_lora"))]


def test_lifecycle_misuse_gives_clear_errors(tmp_path: Path) -> None:
    model = tiny_mlp()
    for call in (lambda: ll.detach(model), lambda: ll.save(model, tmp_path / "x.safetensors")):
        with pytest.raises(RuntimeError, match=r"no lora-lite adapter is attached \(call lora_lite.attach first\)"):
            call()
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.adapter_state_dict(model)
    assert not (tmp_path / "x.safetensors").exists()
    ll.attach(model, ll.LoRAConfig(r=2, target_names=None))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"already has an adapter attached; call lora_lite.detach\(model\) first"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=None))
    assert_unchanged(model, before)
    ll.detach(model)
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.detach(model)
