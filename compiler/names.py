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
    "modules_to_save",
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


# The arguments of each generated method, and the locals its printer may read layer state into.
METHOD_ARGS = {
    "check": frozenset({"cfg", "d_in", "d_out", "problems"}),
    "init": frozenset({"cfg", "d_in", "d_out", "W", "device", "stats"}),
    "residual": frozenset({"layer", "cfg", "W", "d_in", "d_out"}),
    "forward": frozenset({"layer", "cfg", "x", "y", "d_in", "d_out"}),
    "merged": frozenset({"layer", "cfg", "d_in", "d_out"}),
}
LAYER_LOCALS = frozenset({"W", "bias", "d_in", "d_out"})


class Scope:
    """The locals of one generated method. A spec value's local is its own name (the checker makes every
    spec name unique and keeps them off the method's arguments); a temporary avoids all of those."""

    def __init__(self, method: str, spec_names: Collection[str]) -> None:
        self.taken = set(METHOD_ARGS[method] | LAYER_LOCALS) | set(spec_names)

    def temp(self, base: str) -> str:
        """A new local for a temporary."""
        name = fresh(base, self.taken)
        self.taken.add(name)
        return name
