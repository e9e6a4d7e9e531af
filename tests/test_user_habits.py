"""Habits users bring from PEFT, and the clear errors they get instead of tracebacks; the CLI's usage errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_mlp, tiny_qwen

import lora_lite as ll
from lora_lite.cli import main
from lora_lite.runtime import _rank_bound

ROOT = Path(__file__).resolve().parent.parent


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()} | {
        f"grad:{n}": torch.tensor(p.requires_grad) for n, p in model.named_parameters()
    }


def _unchanged(model: torch.nn.Module, before: dict) -> bool:
    after = _state(model)
    return (
        ll.attachment(model) is None
        and after.keys() == before.keys()
        and all(torch.equal(after[k], before[k]) for k in after)
    )


# ---------------------------------------------------------------------------- config fields as PEFT users write them


def test_target_names_as_a_list_of_module_names() -> None:
    model = tiny_qwen()
    names = ll.attach(model, ll.LoRAConfig(target_names=["q_proj", "o_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "o_proj"} and len(names) == 4
    ll.detach(model)
    # a list entry is a literal name (PEFT's rule), matched whole: "proj" selects nothing
    with pytest.raises(ValueError, match="no layer matches"):
        ll.attach(model, ll.LoRAConfig(target_names=["proj"]))
    # and the list survives save / load as the regex it became
    cfg = ll.LoRAConfig(target_names=["v_proj", "q_proj"], exclude_names=["lm_head"])
    assert ll.LoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_target_roles_and_layers_take_one_value() -> None:
    model = tiny_qwen()
    names = ll.attach(model, ll.LoRAConfig(target_names=None, target_roles="writer", target_layers=0))
    # d_out == hidden (64): k and v (64 -> 64, head_dim 32 x 2 kv heads), o_proj and down_proj, block 0 only
    assert [n.removeprefix("model.layers.0.") for n in names] == [
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.down_proj",
    ]
    cfg = ll.LoRAConfig(target_roles="writer", target_layers=0)
    assert (cfg.target_roles, cfg.target_layers) == (("writer",), (0,))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"target_names": 3}, TypeError, r"target_names must be a regex, a list of module names"),
        ({"target_names": []}, TypeError, r"as a list must hold module names"),
        ({"target_names": ["q_proj", None]}, TypeError, r"as a list must hold module names"),
        ({"target_roles": "writers"}, ValueError, r"unknown target_roles \['writers'\]; use one or more of"),
        ({"target_roles": 1}, TypeError, r"target_roles must be a role or a tuple of roles"),
        ({"target_layers": "0"}, TypeError, r"target_layers must be a block index or a tuple of them"),
        ({"target_layers": (0, -1)}, TypeError, r"ints >= 0"),
        ({"target_layers": True}, TypeError, r"target_layers must be a block index"),
        ({"exclude_names": 5}, TypeError, r"exclude_names must be a regex"),
    ],
)
def test_bad_target_fields_are_clear(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        ll.LoRAConfig(**kwargs)


def test_config_class_or_peft_config_is_a_clear_error() -> None:
    model = tiny_qwen()
    before = _state(model)
    with pytest.raises(TypeError, match=r"pass a config instance, not the class LoRAConfig: LoRAConfig\(\)"):
        ll.attach(model, ll.LoRAConfig)
    peft = pytest.importorskip("peft")
    with pytest.raises(
        TypeError, match=r"LoraConfig is a PEFT config; .* use ll\.import_peft\(model, adapter_folder\)"
    ):
        ll.attach(model, peft.LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"attach takes a lora-lite config such as ll\.LoRAConfig\(r=8\), not dict"):
        ll.attach(model, {"r": 8})
    assert _unchanged(model, before)


# ---------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (lambda ids: ids, r"calibration_data is a single tensor, not an iterable of batches \(\[batch\]\)"),
        (lambda ids: {"input_ids": ids}, r"calibration_data is a single dict"),
        (lambda ids: "some text", r"calibration_data is a string"),
        (lambda ids: 3, r"calibration_data is a int, not an iterable"),
        (lambda ids: ["hello world"], r"calibration batch 0 is a str"),
        (lambda ids: [{"text": "hello"}], r"calibration batch 0 is text: tokenize it first"),
        (lambda ids: [(["a", "b"],)], r"calibration batch 0 is text: tokenize it first"),
        (lambda ids: [{"input_ids": ids.tolist()}], r"calibration batch 0 is a dict without string keys and tensor"),
        (lambda ids: [ids, None], r"calibration batch 1 is a NoneType"),
        (
            lambda ids: [{"input_ids": ids.float()}],
            r"the model's forward failed on calibration batch 0 \(dict of input_ids: tensor \[2, 12\] float32\)",
        ),
    ],
    ids=["tensor", "dict", "str", "int", "text-batch", "text-dict", "text-tuple", "lists", "none", "forward-fails"],
)
def test_calibration_data_is_checked_before_any_forward(data, words: str, token_ids: torch.Tensor) -> None:
    model = tiny_qwen()
    before = _state(model)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=words) as info:
        ll.attach(model, ll.EVAConfig(r=4), calibration_data=data(token_ids))
    assert "calibration_data=[{'input_ids': ids}]" in str(info.value)  # the expected form, shown
    if "forward failed" not in words:
        assert len(calls) == int("batch 1" in words)  # no forward, but for the good batch 0 before a bad batch 1
    model._forward_pre_hooks.clear()
    assert _unchanged(model, before)


# ---------------------------------------------------------------------------- PEFT files and lora-lite files


def test_load_on_a_peft_adapter_points_to_import_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(r=2, target_modules=["up"]))
    theirs.save_pretrained(tmp_path)
    model = tiny_mlp()
    before = _state(model)
    with pytest.raises(ValueError, match=r"is a PEFT adapter folder: attach it with lora_lite\.import_peft\(model, "):
        ll.load(model, tmp_path)
    with pytest.raises(ValueError, match=r"is a PEFT adapter .* lora_lite\.import_peft\(model, its_folder\)"):
        ll.load(model, tmp_path / "adapter_model.safetensors")
    assert _unchanged(model, before)


def test_import_peft_on_a_lora_lite_file_points_to_load(tmp_path) -> None:
    model = tiny_mlp()
    ll.attach(model, ll.LoRAConfig(r=2, target_names="up"))
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    before = _state(model)
    with pytest.raises(ll.PeftInteropError, match=r"was written by lora_lite\.save: attach it with lora_lite\.load"):
        ll.import_peft(model, tmp_path / "a.safetensors")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ll.PeftInteropError, match=r"is a file: import_peft takes the PEFT adapter folder"):
        ll.import_peft(model, tmp_path / "x.json")
    assert _unchanged(model, before)


# ---------------------------------------------------------------------------- r larger than a layer can use


def _titles_with_r() -> list[str]:
    ll.import_variants()
    return sorted(
        v.title
        for v in ll.Variant.registry.values()
        if v.spec_hash and "r" in {f.name for f in v.config_class.hyper_fields()}
    )


@pytest.mark.parametrize("title", _titles_with_r())
def test_rank_beyond_the_layer_is_warned_or_refused_for_every_variant(title: str, token_ids: torch.Tensor) -> None:
    """r=1000 on 64-wide layers: refused where the math breaks (an SVD's top r), warned everywhere else."""
    variant = next(v for v in ll.Variant.registry.values() if v.title == title)
    model = tiny_qwen()
    before = _state(model)
    # k_proj: 64 -> 64; VB-LoRA's vectors sized to divide it, so that r alone is too large
    fit = {k: v for k, v in {"vector_length": 16, "num_vectors": 32}.items() if hasattr(variant.config_class(), k)}
    cfg = variant.config_class(r=1000, target_names="k_proj", **fit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ll.attach(model, cfg, calibration_data=[token_ids])
        except ValueError as exc:
            assert "needs r <= " in str(exc) and "k_proj" in str(exc)
            assert _unchanged(model, before)
            return
    rank = [w for w in caught if issubclass(w.category, UserWarning) and "targets can use" in str(w.message)]
    if _rank_bound(variant, cfg, 64, 64) is None:  # VB-LoRA: its slots are logits [r, d_in // b, n], r pairs with no
        assert not rank  # layer dim, so the runtime has no bound to warn with (A's rank is min(r, d_in) all the same)
        return
    assert len(rank) == 1, [str(w.message) for w in caught]
    assert f"{title}: r=1000 is more than 2 targets can use (model.layers.0.self_attn.k_proj: rank 64 at most, " in str(
        rank[0].message
    )
    assert "use r <= 64" in str(rank[0].message)
    ll.detach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r within the layer: no warning
        ll.attach(model, variant.config_class(r=64, target_names="k_proj", **fit), calibration_data=[token_ids])


# ---------------------------------------------------------------------------- CLI


def test_table_with_a_missing_path_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["table", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "lora-lite table: no such file or folder" in err and "Traceback" not in err


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lora_lite", "table", "specs/lora.adapter"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "| [LoRA](https://arxiv.org/abs/2106.09685) | output |" in done.stdout


def test_demo_refuses_zero_steps_before_building_anything(capsys) -> None:
    assert main(["demo", "--steps", "0"]) == 2
    captured = capsys.readouterr()
    assert "--steps must be at least 1, not 0" in captured.err and "lora-lite demo:" not in captured.out
    from lora_lite.demo import run

    with pytest.raises(ValueError, match="at least 1 training step"):
        run(steps=-1)


def test_demo_runs_on_one_thread_and_puts_the_count_back(monkeypatch) -> None:
    from lora_lite import demo

    seen = []
    monkeypatch.setattr(demo, "_run", lambda steps: seen.append(torch.get_num_threads()) or 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert demo.run(steps=1) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["gpt2-lm", "bert-classifier", "t5"])
def test_export_peft_loads_the_base_class_the_adapter_needs(kind: str, tmp_path, capsys) -> None:
    """Not only causal LMs: the base config's architectures (and Auto fallbacks) give the class whose
    module names hold the adapter's targets."""
    pytest.importorskip("peft")
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2-lm":
        base = tf.GPT2LMHeadModel(tf.GPT2Config(**small, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    elif kind == "bert-classifier":
        base = tf.BertForSequenceClassification(
            tf.BertConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        )
    else:
        base = tf.T5ForConditionalGeneration(
            tf.T5Config(**small, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
        )
    base.save_pretrained(tmp_path / "base")
    ll.attach(base, ll.LoRAConfig(r=2))
    ll.save(base, tmp_path / "a.safetensors")
    argv = ["export-peft", str(tmp_path / "a.safetensors"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "o")]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
