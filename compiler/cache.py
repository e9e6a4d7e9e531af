"""The folder where the compiler keeps what it derives from its own files (parser tables, compiled templates)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def cache_dir() -> Path | None:
    """$LORA_LITE_CACHE, else ~/.cache/lora-lite: a folder the user owns, not the shared temp dir (Lark's
    cache is a pickle). None when there is none (no home, not writable): everything is then built each run."""
    try:
        folder = Path(os.environ.get("LORA_LITE_CACHE") or Path.home() / ".cache" / "lora-lite")
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):
        return None
    return folder if os.access(folder, os.W_OK) else None  # Jinja's cache raises on a folder it cannot write
