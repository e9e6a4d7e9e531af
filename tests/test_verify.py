"""`lora-lite verify SPEC_OR_MODULE`: the shared checks (lora_lite/verify.py) on a researcher's variant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import lora_lite as ll
from lora_lite.cli import main
from lora_lite.variant import Variant

GOOD = """adapter rslora "rsLoRA"
hyper r: int = 8
hyper alpha: float = 16
let s = alpha / sqrt(r)
param A[r, d_in] = kaiming
param B[d_out, r] = zeros
output y + s * B @ A @ x
"""
# Not the identity at init (B starts random), and a bf16 gate near 1 that small updates cannot move.
BROKEN = GOOD.replace("adapter rslora", "adapter gated").replace('"rsLoRA"', '"Gated"')
BROKEN = BROKEN.replace("= zeros", "= kaiming\nparam g[d_out] = ones").replace("output y", "output g * y")
CHECKS = [
    "identity at init",
    "gradients reach every adapter tensor, only them",
    "training changes the output",
    "save/load exact",
    "detach bit-exact",
    "bf16 adapters move",
    "torch.compile fullgraph",
]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    ll.import_variants()
    saved = dict(Variant.registry)
    yield tmp_path
    Variant.registry.clear()
    Variant.registry.update(saved)
    for name in [n for n in sys.modules if n.startswith(("lora_lite_verify_", "vgen"))]:
        del sys.modules[name]


def rows(out: str) -> dict[str, str]:
    """check -> "ok" or "FAIL", from the printed table."""
    found = {}
    for line in out.splitlines():
        for check in CHECKS:
            if line.startswith(check + "  "):
                found[check] = line[len(check) :].split()[0]
    return found


def test_a_good_spec_passes_every_check(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "rslora.adapter").write_text(GOOD, encoding="utf-8")
    assert main(["verify", "rslora.adapter", "--hyper", "r=4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rsLoRA from rslora.adapter, RsloraConfig(r=4, alpha=16.0), on a tiny MLP")
    assert rows(out) == dict.fromkeys(CHECKS, "ok")
    assert "8 of 8 checks pass" in out


def test_a_broken_spec_fails_the_checks_it_breaks(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "gated.adapter").write_text(BROKEN, encoding="utf-8")
    assert main(["verify", "gated.adapter"]) == 5
    out = capsys.readouterr().out
    expected = dict.fromkeys(CHECKS, "ok") | {"identity at init": "FAIL", "bf16 adapters move": "FAIL"}
    assert rows(out) == expected
    assert "the init is not the identity" in out
    assert "did not move in 3 bf16 AdamW steps at lr 0.0001 (updates round away): ['up.lora_g', 'down.lora_g']" in out
    assert "6 of 8 checks pass" in out
    assert main(["verify", "gated.adapter", "--lr", "1e-2"]) == 5  # the gate moves at a larger rate; identity: no
    assert rows(capsys.readouterr().out)["bf16 adapters move"] == "ok"


@pytest.mark.parametrize(
    ("claim", "ok"),
    [("Identity at init: no. B starts random.", True), ("identity at init: NO", True), ("", False)]
    + [("Identity at init: B = 0.", False), ("Identity at init: nowhere near", False)],
)
def test_identity_is_checked_as_the_docstring_claims(folder: Path, capsys, claim: str, ok: bool) -> None:
    """A spec whose docstring's "Identity at init:" line starts with "no" is checked to change the output at
    init; any other spec (no line, or a line that says how it is the identity) to leave it equal."""
    source = BROKEN.replace('"Gated"\n', f'"Gated"\n"""\nGated.\n\n{claim}\n"""\n')
    (folder / "gated.adapter").write_text(source, encoding="utf-8")
    main(["verify", "gated.adapter", "--lr", "1e-2"])
    out = capsys.readouterr().out
    assert rows(out)["identity at init"] == ("ok" if ok else "FAIL")
    assert ("not the identity, as its spec says" in out) == ok


def test_a_false_no_claim_fails(folder: Path, capsys) -> None:
    source = GOOD.replace('"rsLoRA"\n', '"rsLoRA"\n"""\nIdentity at init: no.\n"""\n')
    (folder / "rslora.adapter").write_text(source, encoding="utf-8")
    assert main(["verify", "rslora.adapter"]) == 5
    out = capsys.readouterr().out
    assert rows(out)["identity at init"] == "FAIL"
    assert "the spec says it is not the identity at init, but attach changed the output by only 0" in out


def test_verify_takes_a_compiled_module(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "specs").mkdir()
    (folder / "specs" / "rslora.adapter").write_text(GOOD, encoding="utf-8")
    assert main(["compile", "specs", "-o", "vgen"]) == 0
    assert main(["verify", "vgen.rslora", "--hyper", "r=2"]) == 0
    out = capsys.readouterr().out
    assert "rsLoRA from vgen.rslora, RsloraConfig(r=2, alpha=16.0)" in out and "8 of 8 checks pass" in out
    assert main(["verify", "vgen/rslora.py", "--hyper", "r=2"]) == 0  # the module's file: its dotted name
    assert "rsLoRA from vgen.rslora" in capsys.readouterr().out
    assert main(["verify", "vgen/nope.py"]) == 2
    assert "no such file: vgen/nope.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["verify", "missing.adapter"], 2, "no such file: missing.adapter"),
        (["verify", "no_such_module_here"], 2, "No module named 'no_such_module_here'"),
        (["verify", "json"], 2, "json defines no lora-lite variant"),
        (
            ["verify", "rslora.adapter", "--hyper", "rank=4"],
            2,
            "rsLoRA has no hyper 'rank'; its hypers: ['alpha', 'r']",
        ),
        (["verify", "rslora.adapter", "--hyper", "r=four"], 2, "r='four': not a number (int)"),
        (["verify", "rslora.adapter", "--hyper", "r"], 2, "--hyper takes NAME=VALUE"),
        (["verify", "lora.adapter"], 1, "error[E104]: 'lora' is the name of a built-in variant"),
    ],
)
def test_verify_bad_input_is_a_clear_error(folder: Path, capsys, args: list[str], code: int, words: str) -> None:
    (folder / "rslora.adapter").write_text(GOOD, encoding="utf-8")
    (folder / "lora.adapter").write_text(GOOD.replace("adapter rslora", "adapter lora"), encoding="utf-8")
    assert main(args) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_scaled_operator_beside_x_at_the_input_site(folder: Path, capsys) -> None:
    """`s * op(...) @ x` (a coefficient of the chain) and `- s * x` (a negated identity term, merged as -s W):
    compiled, run and merged exactly, every check."""
    spec = """adapter scaled_oft "ScaledOFT"
hyper b: int = 4
hyper s: float = 0.5
param Q[d_in // b, b * (b - 1) // 2] = zeros
let R = cayley(skew(Q, b))
input x + s * blockdiag(R) @ x - s * x
"""
    (folder / "scaled_oft.adapter").write_text(spec, encoding="utf-8")
    assert main(["verify", "scaled_oft.adapter"]) == 0
    assert "8 of 8 checks pass" in capsys.readouterr().out
