"""Text helpers shared by the compiler and the runtime; imports nothing heavy (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def capped(items: Sequence[T], limit: int) -> list[T | str]:
    """The first `limit` items, then the text "... and N more" when there are more: one format for every
    list of problems or names a message shows."""
    return [*items[:limit], f"... and {len(items) - limit} more"] if len(items) > limit else list(items)
