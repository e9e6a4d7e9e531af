"""Every naming rule of the compiler: reserved words, module-level names, class names, fresh names."""

from __future__ import annotations

import keyword
import re
from collections.abc import Collection

# Names the generated code uses itself, and fields every config already has.
RESERVED = frozenset(keyword.kwlist) | {
    "cfg",
    "layer",
    "torch",
    "ops",
    "math",
    "F",
    "device",
    "problems",
    "self",
    "Tensor",
    "dataclass",
    "dtype",
    "variant",
    "target_names",
    "target_roles",
    "target_layers",
    "exclude_names",
    "svd_method",
    "stats",
    "hyper_fields",
    "to_dict",
    "from_dict",
    # Python builtins that run or reach code: no spec value is named like them, so a generated module never
    # mentions them (tests/test_hostile_specs.py checks its AST).
    "eval",
    "exec",
    "compile",
    "open",
    "globals",
    "locals",
    "vars",
    "getattr",
    "setattr",
    "delattr",
    "breakpoint",
}
# Names a generated module binds at its top level: a variant class cannot take them.
MODULE_NAMES = frozenset({"None", "True", "False", "Tensor", "Slot", "Variant", "AdapterConfig", "nn", "torch"})


def class_name(title: str, name: str) -> str:
    """The variant class named from the title's words: "IA3-FF" gives IA3FF."""
    words = re.findall(r"[A-Za-z0-9]+", title) or [name]
    joined = "".join(w if w[0].isupper() or w[0].isdigit() else w.capitalize() for w in words)
    return joined if joined[0].isalpha() else "V" + joined


def fresh(base: str, taken: Collection[str]) -> str:
    """`base`, or `base2`, `base3`, ...: the first not in `taken`."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}{n}"
    return name


class Scope:
    """The locals of one generated method: spec values keep their names, temporaries avoid them."""

    def __init__(self, taken: Collection[str], spec_names: Collection[str]) -> None:
        self.taken = set(taken)
        self.spec_names = frozenset(spec_names)

    def local(self, base: str) -> str:
        """A new local named after a spec value (`base`), never shadowing another local."""
        name = fresh(base, self.taken)
        self.taken.add(name)
        return name

    def temp(self, base: str) -> str:
        """A new local for a temporary: it avoids every spec name too."""
        name = fresh(base, self.taken | self.spec_names)
        self.taken.add(name)
        return name
