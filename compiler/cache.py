"""The folder where the compiler keeps what it derives from its own files (parser tables, compiled templates),
and a content-addressed cache of compiled modules in it.

A compiled module is a function of its spec's bytes, the name the spec is shown by, and the compiler. Its
entry's key hashes those two with `fingerprint()`, which hashes the bytes of every other file the output can
depend on (`inputs()`: the compiler's modules and templates, the grammar, lora_lite's __init__ and _text, the
built-in index and specs, Lark's and Jinja's __init__) and the Python version; the index's key hashes its
(class, module) pairs with the same fingerprint. Edit any of them and the key changes: the spec is compiled
again. Only successful compiles are stored, after the build, and only when the inputs are what they were when
it started and when the process first compiled; an entry whose checksum does not match is compiled again.
`lora-lite compile --check` still compares every output with the file on disk.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

FORMAT = "1"  # bump when what an entry holds changes
ROOT = Path(__file__).resolve().parent.parent  # as in driver: the repository, or the installed lora_lite/


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


def inputs() -> list[Path]:
    """Every file a compiled module can depend on besides its spec: the compiler's modules and templates, the
    grammar, the lora_lite modules the compiler imports (its version, the message capper), the built-in index
    and specs (the name-clash check E104 reads them), and Lark's and Jinja's __init__ (their versions)."""
    compiler = Path(__file__).resolve().parent
    package = Path(sys.modules["lora_lite"].__file__).resolve().parent
    files = [p for p in compiler.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in (ROOT / "grammar").iterdir() if p.is_file()]
    files += [package / "__init__.py", package / "_text.py", ROOT / "generated" / "__init__.py"]
    files += (ROOT / "specs").glob("*.adapter")
    files += [Path(importlib.util.find_spec(name).origin) for name in ("lark", "jinja2")]
    return sorted(files)


def fingerprint() -> str:
    """The hex sha256 of `inputs()` as they are now (names and bytes; a missing file counts as empty) and the
    Python version."""
    global _FIRST
    digest = hashlib.sha256(f"{FORMAT}\0{sys.version}\0".encode())
    for path in inputs():
        digest.update(f"{path.relative_to(path.anchor)}\0".encode())
        data = path.read_bytes() if path.exists() else b""
        digest.update(hashlib.sha256(data).digest())
    found = digest.hexdigest()
    _FIRST = _FIRST or found
    return found


_FIRST: str | None = None  # the fingerprint this process computed first, before it imported the passes


def _entry(fingerprint: str, kind: str, parts: tuple[str, ...]) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    hashes = [hashlib.sha256(p.encode("utf-8", "surrogatepass")).digest() for p in [fingerprint, kind, *parts]]
    return folder / "compiled" / f"{hashlib.sha256(b''.join(hashes)).hexdigest()}.txt"


def lookup(fingerprint: str, kind: str, *parts: str) -> str | None:
    """The text stored for (kind, parts) by a compiler whose inputs had this fingerprint, or None."""
    entry = _entry(fingerprint, kind, parts)
    try:
        data = entry.read_bytes() if entry is not None else b""
    except OSError:  # none yet: compile
        return None
    check, _, body = data.partition(b"\n")
    if check != hashlib.sha256(body).hexdigest().encode():  # damaged: compile
        return None
    return body.decode("utf-8")


def store(started: str, entries: list[tuple[str, tuple[str, ...], str]]) -> None:
    """Keep each (kind, parts, text) of a compile that started when the inputs had the fingerprint `started`,
    if they have it still and had it when this process first compiled (the passes it runs are the modules it
    imported then): an input edited meanwhile would store an output under a key it does not belong to.
    A folder it cannot write to only means nothing is kept."""
    if not entries or cache_dir() is None or not started == _FIRST == fingerprint():
        return
    for kind, parts, text in entries:
        entry = _entry(started, kind, parts)
        body = text.encode("utf-8")
        partial = entry.with_suffix(f".{os.getpid()}.tmp")
        try:
            entry.parent.mkdir(exist_ok=True)
            partial.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
            os.replace(partial, entry)  # whole or not at all, for a process reading it meanwhile
        except OSError:
            return
