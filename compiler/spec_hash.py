"""The spec hash: a sha256 of what a spec computes, not of how its text is laid out.

An adapter file records the hash of the spec its variant was compiled from, and `load`
refuses a file whose hash differs from the installed module's. So the hash must change
when the math changes and only then. It is the sha256 of the spec's tokens, in order,
with these left out:

- comments, spaces and tabs, line continuations (`\\` at the end of a line), blank lines
  (a run of line breaks counts as one);
- the docstring;
- the header's title and URL (they name the classes and the paper, not the math).

Every other token counts, as written: a renamed let, a hyper default, `16` against
`16.0`, a `require` message, the `target` regex. The scanner reads a spec that has
already parsed, so it only needs to split it the way the grammar's terminals do
(grammar/adapter.lark).
"""

from __future__ import annotations

import hashlib
import re

VERSION = "lora-lite spec hash 1"  # change it when the rule above changes

_TOKEN = re.compile(
    r'(?P<doc>"""(?:.|\n)*?""")'
    r'|(?P<str>"(?:[^"\\\n]|\\.)*")'
    r'|(?P<url>https?://[^\s"]+)'
    r"|(?P<comment>#[^\n]*)"
    r"|(?P<cont>\\[\t \f]*\r?\n)"
    r"|(?P<nl>(?:\r?\n[\t \f]*)+)"
    r"|(?P<ws>[\t \f]+)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|\.T|.)"
)


def tokens(source: str) -> list[str]:
    """The tokens the hash covers, in order (line breaks as one "\\n" each)."""
    out: list[str] = []
    header = 0  # 0: before `adapter`, 1: after it (its name), 2: after the name (the title), 3: past the title
    for match in _TOKEN.finditer(source):
        kind, text = match.lastgroup, match.group()
        if kind in ("doc", "url", "comment", "cont", "ws"):
            continue
        if kind == "nl":
            if out and out[-1] != "\n":
                out.append("\n")
            continue
        if header < 3 and (header > 0 or text == "adapter"):
            header += 1
            if header == 3 and kind == "str":  # the title
                continue
        out.append(text)
    if out and out[-1] == "\n":
        out.pop()
    return out


def spec_hash(source: str) -> str:
    """The hex sha256 of a spec's tokens (see the module docstring for what is left out)."""
    return hashlib.sha256("\x1f".join([VERSION, *tokens(source)]).encode()).hexdigest()
