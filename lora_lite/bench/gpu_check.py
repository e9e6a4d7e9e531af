"""The GPU checks of the benchmark, for a machine with one CUDA device: `bash lora_lite/bench/gpu_check.sh OUT`.

1. `speed`: `lora-lite bench --speed --device cuda`: the seed's geometry
   (Qwen3-0.6B's sizes, 28 layers, the full vocabulary, random weights,
   bfloat16, batch 4 x 512): train step ours over PEFT's same method
   (interleaved, median ratio), init time, peak memory, and the hooks' forward
   overhead for a 1 x 512 prefill and a one-token decode with a KV cache.
2. `gsm8k`: `lora-lite gsm8k` on CUDA for a few steps, on a tiny local model and
   local records (the embedded task's problems in MetaMathQA's and GSM8K's
   fields), with `--quant 4bit` and `--quant 8bit`.
3. `quantized`: every quantizable variant on CUDA nf4, fp4 and int8 bases (a
   tiny Qwen3 saved, then loaded by transformers with BitsAndBytesConfig):
   train 6 steps, save, load into a freshly loaded quantized model (same logits),
   detach (the base's logits again).

Each part prints its table and writes under OUT; the exit status is 1 if a
check in part 3 fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

QUANT_BASES = ("nf4", "fp4", "int8")
STEPS = 6


def speed(out: Path) -> None:
    from lora_lite.cli import main

    main(["bench", "--speed", "--device", "cuda", "--out", str(out)])


def _local_model(folder: Path, words: set[str]) -> None:
    """A tiny Qwen3 and a word-level tokenizer over `words`, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lora_lite.tiny import qwen3, qwen3_config

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.save_pretrained(folder)
    # every linear's d_in a multiple of 64 (bitsandbytes' 4-bit block size)
    config = qwen3_config(
        len(vocab), 64, 128, pad_token_id=vocab["[PAD]"], eos_token_id=vocab["[EOS]"], tie_word_embeddings=False
    )
    qwen3(config, seed=0).save_pretrained(folder)


def gsm8k(out: Path, quants: tuple[str, ...] = ("4bit", "8bit")) -> None:
    from lora_lite.bench import task
    from lora_lite.cli import main

    work = Path(tempfile.mkdtemp())
    train, test = task.splits(64, 16, seed=1)
    (work / "train.jsonl").write_text(
        "".join(json.dumps({"query": p.question, "response": p.answer}) + "\n" for p in train)
    )
    (work / "test.jsonl").write_text(
        "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in test)
    )
    words = set(task.Tokenizer().vocab) | {"Question:", "Think", "step", "by", "step.", "Answer:"}
    _local_model(work / "model", words)
    for quant in quants:
        for variant in ("LoRA", "IA3"):
            args = ["gsm8k", "--model", str(work / "model"), "--variant", variant, "--train", str(work / "train.jsonl")]
            args += ["--test", str(work / "test.jsonl"), "--steps", "5", "--val-every", "5", "--n-val", "4"]
            args += ["--max-new-tokens", "16", "--results", str(out / "gsm8k_results.tsv")]
            args += ["--quant", quant] if quant else []
            print(f"\n$ lora-lite {' '.join(args)}", flush=True)
            print(f"exit status {main(args)}", flush=True)


def _bnb_config(base: str):
    from transformers import BitsAndBytesConfig

    if base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=base, bnb_4bit_compute_dtype=torch.bfloat16)


def quantized(out: Path, device: str = "cuda") -> bool:
    """Every quantizable variant on nf4, fp4 and int8 CUDA bases: loss before -> after, save/load and detach exact."""
    from transformers import AutoModelForCausalLM

    import lora_lite as ll
    from lora_lite.bench.methods import ours

    work = Path(tempfile.mkdtemp())
    _local_model(work / "model", {f"w{i}" for i in range(93)})

    def load(base: str):
        model = AutoModelForCausalLM.from_pretrained(
            work / "model", quantization_config=_bnb_config(base), device_map=device, dtype=torch.bfloat16
        )
        return model.train()

    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2)).to(device)
    lines = ["| variant | base | loss before -> after | save/load exact | detach exact |", "|---|---|---|---|---|"]
    ok = True
    for method in ours(r_cap=8):  # r and group sizes that fit the model's 32-wide v_proj
        if not method.quantizable:
            continue
        for base in QUANT_BASES:
            model = load(base)
            with torch.no_grad():
                before = model(input_ids=ids).logits
            try:
                calibration = [{"input_ids": ids}] if method.needs_calibration else None
                ll.attach(model, method.cfg, calibration_data=calibration)
            except ValueError as exc:  # a row that says why, and the part fails; the other variants still run
                ok = False
                lines.append(f"| {method.title} | {base} | refused: {' '.join(str(exc).split())} | - | - |")
                continue
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=5e-2 if method.family == "gain" else 1e-2)
            losses = []
            for _ in range(STEPS):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            with torch.no_grad():
                trained = model(input_ids=ids).logits
            path = work / f"{method.title}-{base}.safetensors"
            ll.save(model, path)
            fresh = load(base)
            ll.load(fresh, path)
            with torch.no_grad():
                reloaded = fresh(input_ids=ids).logits
            ll.detach(model)
            with torch.no_grad():
                detached = model(input_ids=ids).logits
            exact_load, exact_detach = torch.equal(trained, reloaded), torch.equal(before, detached)
            row_ok = exact_load and exact_detach and losses[-1] < losses[0]
            ok &= row_ok
            lines.append(
                f"| {method.title} | {base} | {losses[0]:.4f} -> {losses[-1]:.4f} | {'yes' if exact_load else 'NO'} | "
                f"{'yes' if exact_detach else 'NO'} |"
            )
            del model, fresh
    table = "\n".join(lines)
    print(table)
    (out / "quantized.md").write_text(table + "\n")
    return ok


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    parts = argv[1:] or ["speed", "gsm8k", "quantized"]
    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device")
        return 1
    print(f"gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = True
    for part in parts:
        print(f"\n## {part}", flush=True)
        result = {"speed": speed, "gsm8k": gsm8k, "quantized": quantized}[part](out)
        ok &= result is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
