"""Symbolic tensor dimensions: integer polynomials over d_in, d_out and int hypers.

`Dim` is canonical, so two shapes agree exactly when their dims compare equal:
`r*d_in + d_out*r` and `r*(d_in + d_out)` are the same Dim.

A quotient `P // k` that does not divide out term by term is an atom of its own, named by its text
(`(d_in//b)`), whose numerator and divisor `QUOTIENTS` keeps. It stands for an exact division: the
variant's `check()` tests `P % k == 0` per layer (stage.guards), so `(P // k) * k` normalises to `P`.
"""

from __future__ import annotations

from dataclasses import dataclass

Monomial = tuple[str, ...]  # sorted atom names; () is the constant term
QUOTIENTS: dict[str, tuple[Dim, Dim]] = {}  # quotient atom -> (numerator, divisor)
# `min(a, b)`, `max(a, b)` and `ceil_div(a, b)` of dims that do not simplify: atoms named by their text
FUNCTIONS: dict[str, tuple[str, Dim, Dim]] = {}  # atom -> (function, a, b)
Facts = frozenset[tuple["Dim", "Dim"]]  # pairs (a, b) known to satisfy a <= b (a conditional's branch)


@dataclass(frozen=True)
class Dim:
    """An integer polynomial over named sizes, in canonical form."""

    terms: tuple[tuple[Monomial, int], ...]  # sorted, no zero coefficients

    @staticmethod
    def of(atom: str) -> Dim:
        return Dim((((atom,), 1),))

    @staticmethod
    def const(value: int) -> Dim:
        return Dim((((), value),) if value else ())

    @property
    def constant(self) -> int | None:
        if not self.terms:
            return 0
        if len(self.terms) == 1 and self.terms[0][0] == ():
            return self.terms[0][1]
        return None

    def __add__(self, other: Dim) -> Dim:
        return _make(_merge(dict(self.terms), dict(other.terms), 1))

    def __sub__(self, other: Dim) -> Dim:
        return _make(_merge(dict(self.terms), dict(other.terms), -1))

    def __mul__(self, other: Dim) -> Dim:
        out: dict[Monomial, int] = {}
        for mono_a, coef_a in self.terms:
            for mono_b, coef_b in other.terms:
                mono = tuple(sorted(mono_a + mono_b))
                out[mono] = out.get(mono, 0) + coef_a * coef_b
        return _make(out)

    def __floordiv__(self, other: Dim) -> Dim:
        """self // other: the quotient term by term where it is exact (`(2*r*d_in) // r` is `2*d_in`),
        else a quotient atom. `other` is a single term (an atom product times a positive integer)."""
        ((mono_b, coef_b),) = other.terms
        out: dict[Monomial, int] = {}
        for mono_a, coef_a in self.terms:
            rest = list(mono_a)
            for atom in mono_b:
                if atom not in rest:
                    break
                rest.remove(atom)
            else:
                if coef_a % coef_b == 0:
                    out[tuple(rest)] = coef_a // coef_b
                    continue
            top = str(self) if len(self.terms) == 1 else f"({self})"
            atom = f"({top}//{other})"
            QUOTIENTS[atom] = (self, other)
            return Dim.of(atom)
        return _make(out)

    def code(self, atom_code: dict[str, str], display: bool = False) -> str:
        """Python source for this dim, given the code of each atom (`display`: as the spec writes it)."""
        if not self.terms:
            return "0"
        text = ""
        for mono, coef in self.terms:
            factors = [_atom_code(a, atom_code, display) for a in mono]
            if abs(coef) != 1 or not factors:
                factors.insert(0, str(abs(coef)))
            term = " * ".join(factors)
            if not text:
                text = term if coef > 0 else "-" + term
            else:
                text += (" + " if coef > 0 else " - ") + term
        return text

    def __str__(self) -> str:
        return self.code({}) if not self.atoms() else self.code({a: a for a in self.atoms()}, True).replace(" * ", "*")

    def atoms(self) -> set[str]:
        """The atoms this dim reads, a quotient's own atoms included."""
        found = set()
        for mono, _ in self.terms:
            for atom in mono:
                found.add(atom)
                if atom in QUOTIENTS:
                    numerator, divisor = QUOTIENTS[atom]
                    found |= numerator.atoms() | divisor.atoms()
                if atom in FUNCTIONS:
                    found |= FUNCTIONS[atom][1].atoms() | FUNCTIONS[atom][2].atoms()
        return found

    def quotients(self) -> set[str]:
        """The quotient atoms in this dim (each needs its divisibility checked)."""
        return {a for a in self.atoms() if a in QUOTIENTS}

    def estimate(self, sizes: dict[str, int]) -> int:
        total = 0
        for mono, coef in self.terms:
            value = coef
            for atom in mono:
                if atom in QUOTIENTS:
                    numerator, divisor = QUOTIENTS[atom]
                    value *= max(1, numerator.estimate(sizes) // max(1, divisor.estimate(sizes)))
                elif atom in FUNCTIONS:
                    fn, a, b = FUNCTIONS[atom]
                    value *= max(1, _APPLY[fn](a.estimate(sizes), max(1, b.estimate(sizes))))
                else:
                    value *= sizes.get(atom, 8)
            total += value
        return total

    def assume(self, facts: Facts) -> Dim:
        """This dim where the facts hold: `min(d_in, d_out)` is `d_in` given d_in <= d_out (inside a
        conditional's branch), through every function atom and quotient."""
        if not facts or not any(a in QUOTIENTS or a in FUNCTIONS for a in self.atoms()):
            return self
        return self.substitute(lambda atom: Dim.of(atom), facts)

    def substitute(self, atom_value, facts: Facts = frozenset()) -> Dim:
        """This dim with each plain atom replaced by `atom_value(atom)` (a Dim), inside function atoms and
        quotients too, simplified under `facts`."""
        out = Dim.const(0)
        for mono, coef in self.terms:
            term = Dim.const(coef)
            for atom in mono:
                if atom in FUNCTIONS:
                    fn, a, b = FUNCTIONS[atom]
                    value = dim_function(fn, a.substitute(atom_value, facts), b.substitute(atom_value, facts), facts)
                elif atom in QUOTIENTS:
                    numerator, divisor = QUOTIENTS[atom]
                    value = numerator.substitute(atom_value, facts) // divisor.substitute(atom_value, facts)
                else:
                    value = atom_value(atom)
                term = term * value
            out = out + term
        return out


def dim_function(fn: str, a: Dim, b: Dim, facts: Facts = frozenset()) -> Dim:
    """`min(a, b)`, `max(a, b)` or `ceil_div(a, b)` (b one term, as a divisor of `//`) as a dim: the value
    where it is known (equal or constant arguments, a constant difference, the facts, a division that is
    exact term by term), else an atom of its own."""
    if fn == "ceil_div":
        if a.constant is not None and b.constant is not None:
            return Dim.const(-(-a.constant // b.constant))
        exact = _exact_quotient(a, b)
        if exact is not None:
            return exact
        key = f"ceil_div({a}, {b})"
    else:
        difference = (a - b).constant
        if a == b or difference is not None:
            smaller, larger = (a, b) if a == b or difference < 0 else (b, a)
            return smaller if fn == "min" else larger
        if (a, b) in facts or (b, a) in facts:
            smaller, larger = (a, b) if (a, b) in facts else (b, a)
            return smaller if fn == "min" else larger
        a, b = sorted((a, b), key=str)
        key = f"{fn}({a}, {b})"
    FUNCTIONS[key] = (fn, a, b)
    return Dim.of(key)


def _exact_quotient(a: Dim, b: Dim) -> Dim | None:
    """a // b where b divides every term of a, else None (and no quotient atom is made)."""
    ((mono_b, coef_b),) = b.terms
    out = Dim.const(0)
    for mono_a, coef_a in a.terms:
        rest = list(mono_a)
        if coef_a % coef_b or any(rest.count(x) < mono_b.count(x) for x in set(mono_b)):
            return None
        for x in mono_b:
            rest.remove(x)
        term = Dim.const(coef_a // coef_b)
        for x in rest:
            term = term * Dim.of(x)
        out = out + term
    return out


_APPLY = {"min": min, "max": max, "ceil_div": lambda a, b: -(-a // b)}


def _atom_code(atom: str, atom_code: dict[str, str], display: bool = False) -> str:
    if atom in QUOTIENTS:
        numerator, divisor = QUOTIENTS[atom]
        top = numerator.code(atom_code, display)
        top = top if len(numerator.terms) == 1 and numerator.terms[0][1] == 1 else f"({top})"
        return f"({top} // {divisor.code(atom_code, display)})"
    if atom in FUNCTIONS:
        fn, a, b = FUNCTIONS[atom]
        a_code, b_code = a.code(atom_code, display), b.code(atom_code, display)
        if fn == "ceil_div" and not display:  # Python's ceiling division, as PEFT writes it
            a_code = a_code if len(a.terms) == 1 and a.terms[0][1] == 1 else f"({a_code})"
            return f"-(-{a_code} // {b_code})"
        return f"{fn}({a_code}, {b_code})"
    return atom_code[atom]


def _merge(a: dict[Monomial, int], b: dict[Monomial, int], sign: int) -> dict[Monomial, int]:
    out = dict(a)
    for mono, coef in b.items():
        out[mono] = out.get(mono, 0) + sign * coef
    return out


def _make(terms: dict[Monomial, int]) -> Dim:
    terms = _cancel_quotients(terms)
    kept = [(m, c) for m, c in terms.items() if c]
    return Dim(tuple(sorted(kept, key=lambda mc: (-len(mc[0]), mc[0]))))


def _cancel_quotients(terms: dict[Monomial, int]) -> dict[Monomial, int]:
    """Rewrite each `(P // k) * k * rest` as `P * rest` (P // k is exact: a guard checks it)."""
    while True:
        for mono, coef in terms.items():
            for atom in mono:
                if atom not in QUOTIENTS:
                    continue
                numerator, ((divisor_atoms, divisor_coef),) = QUOTIENTS[atom][0], QUOTIENTS[atom][1].terms
                rest = list(mono)
                rest.remove(atom)
                if coef % divisor_coef or any(rest.count(a) < divisor_atoms.count(a) for a in set(divisor_atoms)):
                    continue
                for a in divisor_atoms:
                    rest.remove(a)
                out = dict(terms)
                del out[mono]
                for mono_n, coef_n in numerator.terms:
                    key = tuple(sorted(tuple(rest) + mono_n))
                    out[key] = out.get(key, 0) + coef_n * (coef // divisor_coef)
                terms = out
                break
            else:
                continue
            break
        else:
            return terms
