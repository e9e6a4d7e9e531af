"""`lora-lite bench --quick`: the embedded benchmark end to end, and its pretrained-base cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lora_lite.bench import core, task
from lora_lite.bench.embedded import QUICK, pretrained_base
from lora_lite.bench.methods import PEFT_METHODS
from lora_lite.cli import main
from lora_lite.generated import VARIANTS


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
    ours = [r for r in rows if r["implementation"] == "lora-lite"]
    peft = [r for r in rows if r["implementation"] == "peft"]
    assert len(ours) == len(VARIANTS)  # every compiled spec is a row
    assert sorted(r["variant"] for r in peft) == sorted(PEFT_METHODS)
    assert [r["variant"] for r in rows if r["implementation"] == "torch"] == ["full fine-tune"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["trainable_params"] > 0 and r["peak_memory_bytes"] > 0
        assert r["median_step_seconds"] > 0 and r["eval_seconds"] > 0
        assert (r["step_ratio_vs_peft"] is not None) == (r["variant"] in PEFT_METHODS)
    # the 4bit/8bit column comes from the specs
    assert {r["variant"]: r["quantizable"] for r in ours}["LoRA"] is True
    assert {r["variant"]: r["quantizable"] for r in ours}["DoRA"] is False
    # the task is one the base cannot do, and fine-tuning teaches it
    assert report["base_accuracy"] <= 0.1
    assert report["full_finetune_accuracy"] > report["base_accuracy"]
    full = next(r for r in rows if r["variant"] == "full fine-tune")
    assert full["trainable_params"] == report["base_params"]
    assert all(r["trainable_params"] < full["trainable_params"] for r in ours)
    assert report["pass_mark"] == pytest.approx(0.5 * report["full_finetune_accuracy"])
    assert all(r["passes"] == (r["accuracy"] >= report["pass_mark"]) for r in ours)
    assert report["forward_overhead"]["ratio"] > 0
    # the markdown table on stdout has one line per row, plus the base
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) + 1
    assert "| LoRA | lora-lite | yes |" in printed
    assert (out / "bench_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    lines = task.pretraining_corpus(30, seed=0)
    assert not any("?" in line and "####" in line for line in lines)  # no question is answered in pretraining


def test_train_batch_masks_the_prompt_and_padding() -> None:
    examples = [core.Example([1, 5, 6], [7, 2], "0"), core.Example([1, 5], [8, 9, 2], "0")]
    batch = core.train_batch(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 8, 9, 2]]
    short = core.train_batch([examples[0], core.Example([1], [2], "0")], pad_id=0)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert short["labels"][1].tolist() == [-100, 2, -100, -100, -100]
