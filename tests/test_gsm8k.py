"""The MetaMathQA -> GSM8K harness, offline: a tiny local model and tokenizer, a few JSON records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from lora_lite.bench.core import extract_answer, normalize_number
from lora_lite.cli import main
from lora_lite.tiny import qwen3, qwen3_config

METAMATH = [
    {
        "query": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "response": "In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72 clips. The answer is: 72",
    },
    {
        "query": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "response": "Weng earns 12 / 60 = $0.2 per minute. So she earned 0.2 x 50 = $10. The answer is: 10",
    },
    {
        "query": "Betty needs $100 for a wallet. She has half of the money. How much more does she need?",
        "response": "Betty has 100 / 2 = $50. She needs 100 - 50 = $50 more. The answer is: 50",
    },
]
GSM8K = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
    },
    {
        "question": "A shop sells 1,200 pens a day. How many pens does it sell in 2 days?",
        "answer": "It sells 1,200 * 2 = <<1200*2=2400>>2,400 pens.\n#### 2,400",
    },
    {
        "question": "Ann had 5 dollars and spent 8. What is her balance?",
        "answer": "Her balance is 5 - 8 = <<5-8=-3>>-3 dollars.\n#### -3",
    },
    {
        "question": "Half of 9 is?",
        "answer": "9 / 2 = <<9/2=4.5>>4.5\n#### 4.5",
    },
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("She pays 2,400 + 600 = $3,000.\n#### 3,000", "3000"),
        ("The answer is $1,234.50", "1234.5"),
        ("The temperature fell to -7 degrees. The answer is: -7", "-7"),
        ("#### -12", "-12"),
        ("He earned $10.00 in total.", "10"),
        ("First 3 + 4 = 7, then 7 * 2 = 14.", "14"),
        ("So the answer is 0.75.", "0.75"),
        ("no digits here", None),
    ],
)
def test_extract_answer_on_gsm8k_style_strings(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_normalize_number() -> None:
    assert normalize_number("1,000,000") == "1000000"
    assert normalize_number("$4.50") == "4.5"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("abc") is None


def _tiny_model(folder: Path) -> None:
    """A tiny Qwen3 and a word-level tokenizer over the records' words, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = set()
    for row in METAMATH:
        words |= set((row["query"] + " " + row["response"]).split())
    for row in GSM8K:
        words |= set((row["question"] + " " + row["answer"]).split())
    words |= {"Question:", "Think", "step", "by", "step.", "Answer:"}
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tokenizer.save_pretrained(folder)
    config = qwen3_config(
        len(vocab),
        32,
        64,
        heads=2,
        kv_heads=1,
        pad_token_id=vocab["[PAD]"],
        eos_token_id=vocab["[EOS]"],
        tie_word_embeddings=False,
    )
    qwen3(config, seed=0).save_pretrained(folder)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("variant", ["LoRA", "IA3-FF", "EVA"])
def test_harness_end_to_end_offline(tmp_path: Path, variant: str, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    _tiny_model(model)
    train = _write(tmp_path / "metamath.jsonl", METAMATH)
    test = _write(tmp_path / "gsm8k.jsonl", GSM8K)
    results = tmp_path / "out" / "results.tsv"
    args = ["gsm8k", "--model", str(model), "--variant", variant, "--train", str(train), "--test", str(test)]
    args += ["--steps", "4", "--batch", "2", "--val-every", "2", "--n-val", "1", "--max-new-tokens", "6"]
    args += ["--dtype", "float32", "--results", str(results)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{variant}: GSM8K accuracy" in out and "on 3 problems" in out
    with results.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 1
    row = rows[0]
    assert row["variant"] == variant and row["n_test"] == "3" and row["steps"] == "4"
    assert 0.0 <= float(row["test_accuracy"]) <= 1.0
    assert int(row["trainable_params"]) > 0
    record = json.loads(results.with_suffix(".jsonl").read_text())
    assert [v["step"] for v in record["validation"]] == [2, 4]
    assert len(record["losses"]) == 4 and all(loss == loss and loss > 0 for loss in record["losses"])
    if variant == "LoRA":  # the seed's LoRA hypers and learning rate
        assert record["hypers"]["r"] == 32 and record["hypers"]["alpha"] == 64 and record["lr"] == 1e-4
    if variant == "IA3-FF":
        assert record["lr"] == 5e-3 and record["hypers"]["target_names"] == "down_proj"
    assert main(args) == 0  # a second run appends
    assert len(results.read_text().splitlines()) == 3


def test_harness_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    _tiny_model(model)
    test = _write(tmp_path / "gsm8k.jsonl", GSM8K)
    base = ["gsm8k", "--model", str(model), "--test", str(test), "--steps", "1"]
    assert main([*base, "--variant", "NoSuch", "--train", str(test)]) == 2
    assert "unknown variant 'NoSuch'" in capsys.readouterr().err
    assert main([*base, "--variant", "LoRA", "--train", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--variant", "LoRA", "--train", str(test)]) == 2  # GSM8K records are not MetaMathQA's
    assert "missing ['query', 'response']" in capsys.readouterr().err
    assert main([*base, "--variant", "LoRA", "--train", str(test), "--quant", "4bit"]) == 2
    assert "CUDA" in capsys.readouterr().err
