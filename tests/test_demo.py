"""`lora-lite demo` end to end, with a few training steps."""

from __future__ import annotations

import pytest

import lora_lite as ll
from lora_lite.demo import CASES, run
from lora_lite.variant import Variant


def test_demo_passes_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(steps=3) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [case.name for case in CASES]
    ll.import_variants()
    assert {case.name for case in CASES} == {v.title for v in Variant.registry.values() if v.spec_hash}
    assert "all checks hold" in out
