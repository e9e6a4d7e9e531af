"""Write compiler/builtins.DOCS into docs/language.md between its `builtins.DOCS` markers.

    python tools/sync_builtin_docs.py

tests/test_compiler.py checks that the two agree; this is how to make them agree after editing DOCS.
"""

from __future__ import annotations

from pathlib import Path

from lora_lite.compiler import builtins

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
START, END = "<!-- builtins.DOCS -->\n", "<!-- end builtins.DOCS -->"


def main() -> None:
    head, rest = DOC.read_text(encoding="utf-8").split(START, 1)
    tail = rest.split(END, 1)[1]
    block = "".join(f"- {doc}\n" for doc in builtins.DOCS.values())
    DOC.write_text(head + START + block + END + tail, encoding="utf-8")


if __name__ == "__main__":
    main()
