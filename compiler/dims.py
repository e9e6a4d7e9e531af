"""Symbolic tensor dimensions: integer polynomials over d_in, d_out and int hypers.

`Dim` is canonical, so two shapes agree exactly when their dims compare equal:
`r*d_in + d_out*r` and `r*(d_in + d_out)` are the same Dim.
"""

from __future__ import annotations

from dataclasses import dataclass

Monomial = tuple[str, ...]  # sorted atom names; () is the constant term


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

    def code(self, atom_code: dict[str, str]) -> str:
        """Python source for this dim, given the code of each atom."""
        if not self.terms:
            return "0"
        text = ""
        for mono, coef in self.terms:
            factors = [atom_code[a] for a in mono]
            if abs(coef) != 1 or not factors:
                factors.insert(0, str(abs(coef)))
            term = " * ".join(factors)
            if not text:
                text = term if coef > 0 else "-" + term
            else:
                text += (" + " if coef > 0 else " - ") + term
        return text

    def __str__(self) -> str:
        return self.code({}) if not self.atoms() else self.code({a: a for a in self.atoms()}).replace(" * ", "*")

    def atoms(self) -> set[str]:
        return {a for mono, _ in self.terms for a in mono}

    def estimate(self, sizes: dict[str, int]) -> int:
        total = 0
        for mono, coef in self.terms:
            value = coef
            for atom in mono:
                value *= sizes.get(atom, 8)
            total += value
        return total


def _merge(a: dict[Monomial, int], b: dict[Monomial, int], sign: int) -> dict[Monomial, int]:
    out = dict(a)
    for mono, coef in b.items():
        out[mono] = out.get(mono, 0) + sign * coef
    return out


def _make(terms: dict[Monomial, int]) -> Dim:
    kept = [(m, c) for m, c in terms.items() if c]
    return Dim(tuple(sorted(kept, key=lambda mc: (-len(mc[0]), mc[0]))))
