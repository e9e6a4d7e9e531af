"""`lora-lite bench --quick`: the embedded benchmark end to end (its controls fail, its base scores near 0%), its
speed section, its PEFT twin rows (one per variant whose record names a twin), and its pretrained-base cache."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.bench import core, task
from lora_lite.bench.base import pretrained_base
from lora_lite.bench.methods import CONTROLS, all_rows, ours, peft_rows, twin_refusals
from lora_lite.bench.settings import QUICK
from lora_lite.cli import main
from lora_lite.generated import VARIANTS
from lora_lite.peft_records import RECORDS, copy_to_twin, record_of

TWINS = sorted(m.title for m in peft_rows(ours()))  # the variants with a PEFT row
# issue 13's methods: each has a PEFT counterpart, so a PEFT row in the benchmark
NEWER = {"RSLoRA", "RSDoRA", "LoRA-FA", "VeRA", "LoHa", "AdaLoRA", "HiRA", "BEFT"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pretrained-base cache for the tests of this module (the first run pretrains, the next reuse it)."""
    return tmp_path_factory.mktemp("cache")


def test_bench_quick_end_to_end(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench_results.json").read_text())
    rows = report["rows"]
    seeds = report["seeds"]
    assert len(seeds) >= 3
    ours = [r for r in rows if r["implementation"] == "lora-lite"]
    peft = [r for r in rows if r["implementation"] == "peft"]
    controls = [r for r in rows if r["implementation"] == "control"]
    assert len(ours) == len(VARIANTS)  # every compiled spec is a row
    assert sorted(r["variant"] for r in peft) == TWINS
    assert sorted(r["variant"] for r in controls) == sorted(CONTROLS)
    assert [r["variant"] for r in rows if r["implementation"] == "torch"] == ["full fine-tune"]
    for r in rows:
        assert len(r["accuracies"]) == len(seeds) and all(0.0 <= a <= 1.0 for a in r["accuracies"])
        assert r["mean_accuracy"] == pytest.approx(sum(r["accuracies"]) / len(seeds))
        assert r["trainable_params"] > 0 and r["peak_memory_bytes"] > 0
        assert r["median_step_seconds"] > 0 and r["eval_seconds"] > 0 and r["init_seconds"] > 0
        has_twin = r["variant"] in TWINS and r["implementation"] in ("lora-lite", "peft")
        assert (r["step_ratio_vs_peft"] is not None) == has_twin
        assert (r["init_ratio_vs_peft"] is not None) == has_twin
    # the 4bit/8bit column comes from the specs
    assert {r["variant"]: r["quantizable"] for r in ours}["LoRA"] is True
    assert {r["variant"]: r["quantizable"] for r in ours}["DoRA"] is False
    # the task is one the base cannot do, and fine-tuning teaches it
    assert report["base_accuracy"] <= 0.05
    assert report["full_finetune_accuracy"] > report["base_accuracy"] + 0.2
    full = next(r for r in rows if r["variant"] == "full fine-tune")
    assert full["trainable_params"] == report["base_params"]
    assert all(r["trainable_params"] < full["trainable_params"] for r in ours)
    assert report["pass_mark"] == pytest.approx(0.5 * report["full_finetune_accuracy"])
    assert all(r["passes"] == (r["mean_accuracy"] >= report["pass_mark"]) for r in ours + peft + controls)
    # the controls cannot train: they score the base's accuracy on every seed, and fail
    for r in controls:
        assert r["accuracies"] == [report["base_accuracy"]] * len(seeds)
        assert r["passes"] is False
    assert report["broken"] is None
    # the markdown table on stdout has one line per row, plus the base
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) + 1
    assert "| LoRA | lora-lite | yes |" in printed
    assert "| LoRA | control: gradient zeroed | - | " in printed
    assert (out / "bench_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--speed", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "speed_results.json").read_text())
    assert sorted(r["variant"] for r in report["rows"]) == TWINS
    assert report["no_twin"] == twin_refusals(ours()) and "AntiPaSTO" in report["no_twin"]
    for r in report["rows"]:
        assert r["ratio"] > 0 and r["met"] == (r["ratio"] <= r["target"])
        assert r["ours_init_seconds"] > 0 and r["peft_init_seconds"] > 0
        assert r["ours_peak_bytes"] > 0 and r["peft_peak_bytes"] > 0
    forward = report["forward"]
    assert forward["prefill_ratio"] > 0 and forward["decode_ratio"] > 0
    assert "| LoRA | " in printed and "one-token decode with a KV cache" in printed


def test_every_variant_has_a_peft_row_or_its_record_says_why() -> None:
    mine = ours()
    # every compiled variant has a record of its own: a twin, or the reason PEFT has none
    assert sorted(ll.Variant.for_config(m.cfg).name for m in mine) == sorted(RECORDS)
    keys = [m.key for m in all_rows(with_controls=True)]
    refusals = twin_refusals(mine)
    for m in mine:
        record = record_of(m.cfg)
        if record.twin is None:
            assert f"{m.title} (peft)" not in keys
            assert refusals[m.title] == record.refused and record.refused
        else:  # PEFT's row follows ours
            assert keys[keys.index(m.key) + 1] == f"{m.title} (peft)" and m.title not in refusals
    assert NEWER | {"LoRA", "PiSSA", "DoRA", "DeLoRA", "IA3", "IA3-FF", "HRA", "EVA"} <= set(TWINS)
    no_twin = {"AntiPaSTO", "AntiPaSTO-ablate", "AntiPaSTO-arrow", "AntiPaSTO-CorDA", "DEFT", "RoAd-4", "TinyLoRA"}
    no_twin |= {"FourierFT", "WaveFT", "GraLoRA"}
    assert set(refusals) == {m.title for m in mine if record_of(m.cfg).twin is None} <= no_twin


@pytest.mark.parametrize("title", TWINS)
def test_each_peft_row_computes_what_ours_does_from_the_same_values(title: str) -> None:
    """The bench's two rows of a method on a tiny Qwen3 (our row's config, targets and r): after copy_to_twin, with
    our trainable tensors off their identity init, PEFT's model gives our logits and trains as many parameters."""
    from lora_lite.tiny import qwen3, qwen3_config

    ours_row, peft_row = (m for m in all_rows(r_cap=4) if m.title == title)
    base = qwen3(qwen3_config(), seed=0)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    mine = ours_row.build(copy.deepcopy(base), calibration)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (p for p in mine.parameters() if p.requires_grad):
            p.add_(0.05 * p.abs().mean().clamp(min=0.1) * torch.randn(p.shape, generator=gen))
    torch.manual_seed(0)
    theirs = peft_row.build(copy.deepcopy(base), calibration)
    pairs = copy_to_twin(mine, theirs)
    assert pairs and all(t.requires_grad == p.requires_grad for _, t, p in pairs)
    assert sum(p.numel() for p in mine.parameters() if p.requires_grad) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    mine.train(), theirs.train()  # as the bench trains them: PVeRA samples, alike on both sides from one seed
    with torch.no_grad():
        torch.manual_seed(3)
        expected = mine(input_ids=ids).logits
        torch.manual_seed(3)
        got = theirs(input_ids=ids).logits
    assert (expected - base(input_ids=ids).logits).abs().max() > 1e-4  # off the identity: the test can tell
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_bench_refuses_an_unknown_method_title(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--speed", "--methods", "LoRA,NoSuchLoRA"]) == 1
    printed = capsys.readouterr().out
    assert "no variant titled NoSuchLoRA; the titles: " in printed and "VB-LoRA" in printed


def test_bench_refuses_a_device_it_lacks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    assert main(["bench", "--speed", "--device", "cuda"]) == 1
    assert "sees no CUDA device" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu:0"]) == 1  # --device is for the speed section
    assert "lora-lite bench --speed --device" in capsys.readouterr().out


def test_bench_profile_shows_where_a_step_goes(cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--profile", "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    for key in ("LoRA (lora-lite)", "LoRA (peft)", "DoRA (lora-lite)", "DoRA (peft)", "HRA (lora-lite)", "HRA (peft)"):
        assert f"### {key}: 3 train steps" in printed
    assert printed.count("Self CPU time total") == 6
    assert "aten::mm" in printed


def test_pretrained_base_is_cached_by_its_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    settings = replace(QUICK, pretrain_steps=2, pretrain_batch=4)
    tok = task.Tokenizer()
    first = pretrained_base(settings, tok, tmp_path)
    assert "saved to" in capsys.readouterr().out
    second = pretrained_base(settings, tok, tmp_path)
    assert "(cached)" in capsys.readouterr().out
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = replace(settings, pretrain_steps=3)
    assert other.pretrain_key() != settings.pretrain_key()
    assert len(list(tmp_path.iterdir())) == 1


def test_task_splits_are_disjoint_and_the_answers_right() -> None:
    train, test = task.splits(500, 100, seed=3)
    assert not {p.question for p in train} & {p.question for p in test}
    tok = task.Tokenizer()
    for p in train + test:
        assert 0 <= p.result <= task.MAX_NUMBER
        assert core.extract_answer(p.answer) == str(p.result)
        assert tok.decode(tok.encode(p.question)) == p.question  # every word is in the vocabulary
    lines = task.pretraining_corpus(600, seed=0)
    asked = [line for line in lines if "?" in line]
    answered = [line for line in asked if "####" in line]
    # pretraining answers one question in ANSWERED_EVERY: the skill is there, under a prior to stop
    assert len(answered) == len(asked) // task.ANSWERED_EVERY
    for line in answered:
        question, answer = line.split(" ? ")
        assert core.extract_answer(answer) is not None


def test_train_batch_masks_the_prompt_and_padding() -> None:
    examples = [core.Example([1, 5, 6], [7, 2], "0"), core.Example([1, 5], [8, 9, 2], "0")]
    batch = core.train_batch(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 8, 9, 2]]
    short = core.train_batch([examples[0], core.Example([1], [2], "0")], pad_id=0)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert short["labels"][1].tolist() == [-100, 2, -100, -100, -100]
