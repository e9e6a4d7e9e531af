"""Write `lora-lite table specs` into README.md between its `lora-lite table` markers.

    python tools/sync_readme_table.py

tests/test_cli.py checks that the two agree; this is how to make them agree after adding or changing a spec.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from lora_lite.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- lora-lite table -->\n", "<!-- end lora-lite table -->"


def main() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["table", str(ROOT / "specs")]) == 0
    readme = ROOT / "README.md"
    head, rest = readme.read_text(encoding="utf-8").split(START, 1)
    readme.write_text(head + START + out.getvalue() + END + rest.split(END, 1)[1], encoding="utf-8")


if __name__ == "__main__":
    main()
